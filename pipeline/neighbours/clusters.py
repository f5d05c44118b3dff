"""Near-duplicate pairs and clusters from the neighbour rows: memory bounded by the pairs, not the corpus.

`duplicate_pairs` streams the neighbour rows (id, neighbour_ids, distances) and keeps each
neighbour at or under the threshold as one pair (id_a < id_b, the smaller distance when both
rows name it). `clusters` joins the pairs into connected components (scipy's csgraph over
the pairs' ids only) and suggests a keeper per cluster: the lowest reconstruction error
(`mse`: the most typical picture of the group, and a re-encoded copy has a higher one than its
original), ties and rows without one broken by id. Clusters are numbered 1, 2, ... from the
largest (ties by their smallest id).

Two images whose chain of neighbours under the threshold connects them land in one cluster
even when they are farther apart themselves: that is what "connected components" means,
and why the threshold is calibrated tight.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.latents import latent_dataset
from pipeline.neighbour_output import CLUSTERS_SCHEMA, PAIRS_SCHEMA, neighbour_files

BATCH_ROWS = 65_536


def duplicate_pairs(neighbours_url: str, threshold: float) -> pa.Table:
    """Every neighbour pair at or under `threshold`, once: id_a < id_b, distance; sorted."""
    fs, paths = neighbour_files(neighbours_url)
    found = []
    if paths:
        dataset = pads.dataset(paths, filesystem=fs, format="parquet")
        for batch in dataset.to_batches(columns=["id", "neighbour_ids", "distances"], batch_size=BATCH_ROWS):
            others = pc.list_flatten(batch.column("neighbour_ids"))
            distances = pc.list_flatten(batch.column("distances"))
            owners = pc.take(batch.column("id"), pc.list_parent_indices(batch.column("neighbour_ids")))
            close = pc.less_equal(distances, pa.scalar(threshold, pa.float32()))
            owners, others, distances = (pc.filter(a, close) for a in (owners, others, distances))
            first = pc.less(owners, others)
            found.append(pa.table({"id_a": pc.if_else(first, owners, others),
                                   "id_b": pc.if_else(first, others, owners), "distance": distances}))
    if not found:
        return PAIRS_SCHEMA.empty_table()
    pairs = pa.concat_tables(found).group_by(["id_a", "id_b"]).aggregate([("distance", "min")])
    pairs = pairs.rename_columns(["id_a", "id_b", "distance"]).cast(PAIRS_SCHEMA)
    return pairs.sort_by([("id_a", "ascending"), ("id_b", "ascending")])


def _scores(latents_url: str, ids: pa.Array) -> dict[str, float]:
    """{id: mse} for `ids`, by a filtered read of the latents (empty when they have no mse)."""
    dataset = latent_dataset(latents_url)
    if "mse" not in dataset.schema.names or not len(ids):
        return {}
    table = dataset.to_table(columns=["id", "mse"], filter=pc.field("id").isin(ids))
    return {i: m for i, m in zip(table.column("id").to_pylist(), table.column("mse").to_pylist()) if m is not None}


def clusters(pairs: pa.Table, latents_url: str) -> pa.Table:
    """The connected components of `pairs`: cluster, id, keeper, size, mse (CLUSTERS_SCHEMA)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not pairs.num_rows:
        return CLUSTERS_SCHEMA.empty_table()
    ids = pc.unique(pa.concat_arrays([pairs.column("id_a").combine_chunks(), pairs.column("id_b").combine_chunks()]))
    ids = ids.take(pc.sort_indices(ids))
    a = pc.index_in(pairs.column("id_a"), value_set=ids).to_numpy()
    b = pc.index_in(pairs.column("id_b"), value_set=ids).to_numpy()
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(len(ids), len(ids)))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    first_member = np.full(len(sizes), len(ids))
    np.minimum.at(first_member, component, np.arange(len(ids)))  # ids are sorted: the smallest id's position
    order = np.lexsort((first_member, -sizes))  # largest first, then by smallest id
    number = np.empty(len(sizes), np.int32)
    number[order] = np.arange(1, len(sizes) + 1, dtype=np.int32)
    names = ids.to_pylist()
    mse = _scores(latents_url, ids)
    keeper_of: dict[int, int] = {}
    for position, group in enumerate(component.tolist()):
        best = keeper_of.get(group)
        if best is None or _keeper_key(names[position], mse) < _keeper_key(names[best], mse):
            keeper_of[group] = position
    keeper = np.zeros(len(ids), bool)
    keeper[list(keeper_of.values())] = True
    table = pa.table({"cluster": pa.array(number[component]), "id": ids, "keeper": pa.array(keeper),
                      "size": pa.array(sizes[component].astype(np.int32)),
                      "mse": pa.array([mse.get(n) for n in names], pa.float32())}, schema=CLUSTERS_SCHEMA)
    return table.sort_by([("cluster", "ascending"), ("keeper", "descending"), ("id", "ascending")])


def _keeper_key(row_id: str, mse: dict[str, float]) -> tuple[bool, float, str]:
    score = mse.get(row_id)
    return (score is None, score if score is not None else 0.0, row_id)


def cluster_summary(pairs: pa.Table, table: pa.Table) -> dict[str, Any]:
    """Counts for the job's summary: pairs, clusters, rows in them, rows a clean-up would drop, sizes."""
    per_cluster = (table.group_by("cluster").aggregate([("size", "max")]).column("size_max").to_numpy()
                   if table.num_rows else np.zeros(0, np.int32))
    sizes, counts = np.unique(per_cluster, return_counts=True)
    return {"pairs": pairs.num_rows, "clusters": int(len(per_cluster)), "rows_in_clusters": table.num_rows,
            "rows_to_drop": int(table.num_rows - len(per_cluster)),
            "largest_cluster": int(per_cluster.max()) if len(per_cluster) else 0,
            "clusters_by_size": {str(s): int(c) for s, c in zip(sizes, counts)}}
