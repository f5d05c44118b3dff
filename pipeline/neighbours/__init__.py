"""Nearest neighbours and near-duplicates over a latent dataset, at corpus scale.

latent dataset -> faiss index (flat, or IVF-PQ above FLAT_MAX_ROWS rows) -> every row's k
nearest ids and distances (Ray Data, exactly once) -> near-duplicate pairs under a
calibrated threshold -> clusters, each with a suggested keeper. `query` asks the same index
for the neighbours of new images or of ids. The output folder's files are listed in
pipeline/neighbour_output.py (the core module the report reads them through).

The files, along those steps:
    index.py      choose, build (streaming), save, load and search the index
    edits.py      the edits that make a near-duplicate (crop, rescale, JPEG, border, overlay, flip)
    calibrate.py  the duplicate threshold from images and edited copies of them
    clusters.py   pairs under the threshold, connected components, keepers
    job.py        NeighboursConfig, `prepare` (every check, no Ray) and `run`; the mapper
                  `NeighbourSearch`
    query.py      `query(...)` and the `jobs.query` entry point's config
"""

from pipeline.neighbours.calibrate import calibrate_threshold, choose_threshold
from pipeline.neighbours.edits import EDIT_KINDS, Edits, edited_copy
from pipeline.neighbours.clusters import clusters, duplicate_pairs
from pipeline.neighbours.index import (
    FLAT_MAX_ROWS,
    LoadedIndex,
    build_index,
    plan_index,
)
from pipeline.neighbours.job import (
    NeighboursConfig,
    NeighbourSearch,
    NeighboursPlan,
    NeighboursSummary,
    neighbours,
    prepare,
    run,
)
from pipeline.neighbours.query import QueryConfig, query, run_query

__all__ = [
    "FLAT_MAX_ROWS", "LoadedIndex", "NeighbourSearch", "NeighboursConfig", "NeighboursPlan", "NeighboursSummary",
    "QueryConfig", "EDIT_KINDS", "Edits", "edited_copy", "build_index", "calibrate_threshold", "choose_threshold", "clusters",
    "duplicate_pairs", "neighbours", "plan_index", "prepare", "query", "run", "run_query",
]
