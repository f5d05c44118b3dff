"""The "Near-duplicates" section: the largest clusters of a neighbours output, a thumbnail strip each.

Reads the neighbours job's files through `pipeline.neighbour_output` (core), never the
neighbours stage itself. The clusters are the lowest-numbered ones (numbered by size), read
with a filter; their images are fetched from --data by id (`fetch_images`, as the galleries
are) and drawn side by side, the suggested keeper first inside a green frame. File names are
ours (`images/duplicates-0001.png`), never the ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.images import decode_batch, encode_image
from pipeline.neighbour_output import read_largest_clusters
from pipeline.report.galleries import fetch_images
from pipeline.report.output import duplicates_file
from pipeline.shards import Columns, ShardList

MAX_CLUSTERS = 10
STRIP_MEMBERS = 8  # thumbnails per strip; the rest of a cluster is listed, not drawn
THUMBNAIL = 64
FRAME = 3
KEEPER_COLOUR = (40, 170, 60)
MISSING_GREY = 128


def _strip(pixels: list[np.ndarray | None]) -> np.ndarray:
    """(T, T*n, 3) uint8: the thumbnails side by side, the first framed, a grey tile where one is missing."""
    tiles = []
    for n, tile in enumerate(pixels):
        tile = np.full((THUMBNAIL, THUMBNAIL, 3), MISSING_GREY, np.uint8) if tile is None else tile.copy()
        if n == 0:  # the keeper
            tile[:FRAME], tile[-FRAME:], tile[:, :FRAME], tile[:, -FRAME:] = (KEEPER_COLOUR,) * 4
        tiles.append(tile)
    return np.concatenate(tiles, axis=1)


def near_duplicates_section(neighbours_url: str, record: dict[str, Any], shards: ShardList | None,
                            columns: Columns, files: dict[str, bytes], notes: list[str]) -> dict[str, Any]:
    """summary.json's `near_duplicates`; the strips go into `files`."""
    summary = record.get("summary") or {}
    threshold = record.get("threshold") or {}
    largest = read_largest_clusters(neighbours_url, MAX_CLUSTERS)
    images: dict[str, bytes | None] = {}
    if shards is not None and largest:
        wanted = [m["id"] for c in largest for m in c["members"][:STRIP_MEMBERS]]
        images = fetch_images(shards, columns, wanted)
    elif largest:
        notes.append("near-duplicate thumbnails omitted: they need --data (the image shards)")
    for rank, cluster in enumerate(largest, start=1):
        shown = cluster["members"][:STRIP_MEMBERS]
        cluster["shown"] = len(shown)
        cluster["image"] = None
        if shards is None:
            continue
        present = [m["id"] for m in shown if images.get(m["id"]) is not None]
        pixels, reasons = decode_batch([images[i] for i in present], THUMBNAIL, 3)
        decoded = {i: pixels[n] for n, i in enumerate(present) if reasons[n] is None}
        cluster["image"] = duplicates_file(rank)
        files[cluster["image"]] = encode_image(_strip([decoded.get(m["id"]) for m in shown]))
    return {"url": neighbours_url, "threshold": threshold.get("value"), "threshold_rule": threshold.get("rule"),
            "recall_on_copies": threshold.get("recall_on_positives"),
            "recall_by_edit": {kind: got["recall"] for kind, got in (threshold.get("recall_by_edit") or {}).items()
                               if got.get("copies")},
            "false_positive_rate": threshold.get("false_positive_rate_on_negatives"),
            "rows": summary.get("rows_in"), "pairs": summary.get("pairs"), "clusters": summary.get("clusters"),
            "rows_in_clusters": summary.get("rows_in_clusters"), "rows_to_drop": summary.get("rows_to_drop"),
            "largest": largest}
