"""Neighbours job: planted near-duplicates found, IVF-PQ against brute force, int8 = float32, resumable, query.

The planted corpus: originals from `pipeline.synth.synthetic_image`, kept only when they are
clearly distinct from every other kept one in pixel space (the synthetic family holds a few
pairs that differ by a few grey levels: near-duplicates themselves, which would make the
ground truth ambiguous), and copies of some of them made the way crawls make them: resized
down and up, lightly cropped and resized back, JPEG re-encoded, by this module's own code
(not the calibration's). A small Fire model is trained on the originals here: the shared
tiny models are too weak to separate a copy from a different image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from builders import fit_briefly, kill_part_way, rows_written
from PIL import Image

from pipeline import storage
from pipeline.checkpoint import save_checkpoint
from pipeline.embed import EmbedConfig, embed, embed_reference
from pipeline.errors import InputError, JobFailed
from pipeline.images import decode_batch, encode_image
from pipeline.latents import SUCCESS_FILE, fixed_size_list, write_success
from pipeline.lease import LEASE_DIR
from pipeline.model import AutoencoderConfig, build_model
from pipeline.neighbour_output import (
    CLUSTERS_FILE,
    PAIRS_FILE,
    RUN_FILE,
    neighbour_files,
)
from pipeline.neighbours import (
    LoadedIndex,
    NeighboursConfig,
    NeighbourSearch,
    build_index,
    choose_threshold,
    clusters,
    duplicate_pairs,
    neighbours,
    plan_index,
    prepare,
    query,
)
from pipeline.neighbours.edits import DEFAULT_EDITS, Edits, edited_copy
from pipeline.scoring import mse_per_image
from pipeline.thresholds import calibration_from_errors
from pipeline.shards import write_shard
from pipeline.synth import synthetic_image

REPO = Path(__file__).resolve().parents[1]
SOURCE, SIZE = 64, 32  # originals' pixels, model's
ORIGINALS, PLANTED, COPIES = 160, 30, 2
DISTINCT = 3.0  # least pixel-space L2 (decoded at SIZE, [0, 1]) between two kept originals


# ---------------------------------------------------------------- builders


# The planted copies and the fixture's calibration use the same edits, the job's own
# (pipeline.neighbours.edits): one per copy, crops of up to 2% of each side. Stacked edits
# (a rescale, a crop and a JPEG on one copy) can move this small plain model's latent as far as
# a distinct image is: tests/test_invariance.py plants copies for a model trained against that.
PLANTED_EDITS = Edits(kinds=("crop", "rescale", "jpeg"), crop=(0.0, 0.02))


def near_copy(pixels: np.ndarray, kind: str, rng: np.random.Generator) -> bytes:
    """A copy of `pixels` through one of PLANTED_EDITS's edits."""
    return edited_copy(encode_image(pixels), kind, rng, PLANTED_EDITS)


def distinct_originals(n: int) -> list[np.ndarray]:
    """The first `n` synthetic images that are all at least DISTINCT apart (pixels at the model's size)."""
    kept, kept_pixels = [], []
    index = 0
    while len(kept) < n:
        image = synthetic_image(index, 11, SOURCE, 3)
        pixels = decode_batch([encode_image(image)], SIZE, 3)[0][0].reshape(-1) / 255.0
        if all(np.linalg.norm(pixels - other) > DISTINCT for other in kept_pixels):
            kept.append(image)
            kept_pixels.append(pixels)
        index += 1
    return kept


def train_model(url: str, images: list[np.ndarray], steps: int = 400) -> str:
    """A small Fire autoencoder fitted to `images`: base width 16, latent 32, one thread.

    One torch thread: on a shared 2-core machine, two threads spin against other processes
    and a step took 30x longer.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(AutoencoderConfig(image_size=SIZE, channels=3, latent_dim=32, base_width=16))
        pixels, _ = decode_batch([encode_image(i) for i in images], SIZE, 3)
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        fit_briefly(model, x, steps, batch_size=64, lr=5e-3)
        with torch.inference_mode():
            errors = mse_per_image(x, model(x)["x_hat"]).numpy()
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(url, model, training={"calibration": calibration_from_errors(errors),
                                          "preprocessing": {"resize": "pad"}})
    return url


def finish(latents: str | Path) -> str:
    """Mark a hand-made latent dataset finished, as the embed job does when every row is written."""
    write_success(str(latents), {})
    return str(latents)


def random_latents(root: Path, n: int, dim: int, files: int, seed: int = 0, null_rows: tuple[int, ...] = (),
                   structured: bool = True) -> tuple[str, np.ndarray, list[str]]:
    """A finished latent dataset of n float32 vectors (a few-dimensional structure plus noise)."""
    rng = np.random.default_rng(seed)
    if structured:
        z = rng.standard_normal((n, 6)).astype(np.float32) @ rng.standard_normal((6, dim)).astype(np.float32)
        z += 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    else:
        z = rng.standard_normal((n, dim)).astype(np.float32)
    ids = [f"row-{i:06d}" for i in range(n)]
    valid = np.ones(n, bool)
    valid[list(null_rows)] = False
    root.mkdir(parents=True)
    for part, rows in enumerate(np.array_split(np.arange(n), files)):
        errors = [None if valid[r] else "not an image" for r in rows]
        pq.write_table(pa.table({"id": [ids[r] for r in rows], "latent": fixed_size_list(z[rows], valid[rows]),
                                 "mse": pa.array(rng.random(len(rows)).astype(np.float32)),
                                 "error": pa.array(errors, pa.string())}), root / f"part-{part:04d}.parquet")
    return finish(root), z, ids


def brute_force(z: np.ndarray, k: int) -> np.ndarray:
    """(N, k) rows of each row's k nearest other rows, exactly (numpy)."""
    squared = (z * z).sum(1)
    distances = squared[:, None] - 2 * z @ z.T + squared[None, :]
    np.fill_diagonal(distances, np.inf)
    return np.argsort(distances, axis=1)[:, :k]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Originals (the model's training shards), the corpus with planted copies, and the groups."""
    root = tmp_path_factory.mktemp("planted")
    originals = distinct_originals(ORIGINALS)
    ids = [f"orig-{i:04d}" for i in range(ORIGINALS)]
    images = [encode_image(o) for o in originals]
    write_shard(str(root / "originals" / "part-00000.parquet"), pa.table({"id": ids, "image": pa.array(images)}))
    groups, copy_ids, copies = [], [], []
    for n in range(PLANTED):
        group = [ids[n]]
        for c in range(COPIES):
            copy_id = f"copy-{n:04d}-{c}"
            kind = PLANTED_EDITS.kinds[(COPIES * n + c) % len(PLANTED_EDITS.kinds)]
            copies.append(near_copy(originals[n], kind, np.random.default_rng([7, n, c])))
            copy_ids.append(copy_id)
            group.append(copy_id)
        groups.append(frozenset(group))
    corpus = root / "corpus"
    write_shard(str(corpus / "part-00000.parquet"), pa.table({"id": ids[:80], "image": pa.array(images[:80])}))
    write_shard(str(corpus / "part-00001.parquet"), pa.table({"id": ids[80:] + copy_ids,
                                                              "image": pa.array(images[80:] + copies)}))
    model = train_model(str(root / "model"), originals)
    return {"root": root, "originals": str(root / "originals"), "corpus": str(corpus), "model": model,
            "groups": groups, "copies": dict(zip(copy_ids, copies)), "ids": ids + copy_ids}


@pytest.fixture(scope="module")
def planted_run(planted, ray_local):
    """The real embed job, then the real neighbours job with a calibrated threshold."""
    root = planted["root"]
    embed(EmbedConfig(data_url=planted["corpus"], model_url=planted["model"], out_url=str(root / "latents")))
    # Calibrated on the planted copies' edits (PLANTED_EDITS): the default crops of up to 15%,
    # borders and overlays move this model's latents as far as a different image does.
    cfg = NeighboursConfig(latents_url=str(root / "latents"), out_url=str(root / "neighbours"), k=5,
                           model_url=planted["model"], data_url=planted["originals"],
                           calibration_edits=PLANTED_EDITS.kinds, calibration_crop=PLANTED_EDITS.crop)
    return cfg, neighbours(cfg)


# ---------------------------------------------------------------- the planted corpus, end to end


def _pairs_of(groups) -> set[frozenset]:
    return {frozenset((a, b)) for g in groups for a in g for b in g if a < b}


@pytest.mark.ray
def test_planted_near_duplicates_are_the_clusters_found(planted, planted_run):
    cfg, summary = planted_run
    assert (summary.rows_in, summary.rows_out, summary.rows_without_latent) == (220, 220, 0)
    found = pq.read_table(storage.join(cfg.out_url, CLUSTERS_FILE)).to_pylist()
    by_cluster: dict[int, set[str]] = {}
    for row in found:
        by_cluster.setdefault(row["cluster"], set()).add(row["id"])
    found_pairs, planted_pairs = _pairs_of(by_cluster.values()), _pairs_of(planted["groups"])
    precision = len(found_pairs & planted_pairs) / max(len(found_pairs), 1)
    recall = len(found_pairs & planted_pairs) / len(planted_pairs)
    print(f"pairs found {len(found_pairs)}, planted {len(planted_pairs)}: precision {precision:.3f}, "
          f"recall {recall:.3f}; threshold {summary.threshold:.4g}")
    assert precision >= 0.95 and recall >= 0.95
    # Distinct images are never merged: no cluster holds two originals.
    assert all(sum(i.startswith("orig-") for i in members) <= 1 for members in by_cluster.values())
    # One keeper per cluster, the lowest mse of it; sizes and numbering from the largest.
    for number, members in by_cluster.items():
        rows = [r for r in found if r["cluster"] == number]
        keepers = [r for r in rows if r["keeper"]]
        assert len(keepers) == 1 and keepers[0]["mse"] == min(r["mse"] for r in rows)
        assert {r["size"] for r in rows} == {len(members)}
    sizes = [len(by_cluster[n]) for n in sorted(by_cluster)]
    assert sizes == sorted(sizes, reverse=True)
    pairs = pq.read_table(storage.join(cfg.out_url, PAIRS_FILE))
    assert pairs.num_rows == summary.pairs and all(a < b for a, b in zip(pairs.column("id_a").to_pylist(),
                                                                          pairs.column("id_b").to_pylist()))
    assert max(pairs.column("distance").to_pylist()) <= summary.threshold
    # The calibration is recorded: its value, the rule, and what it gives on the calibration set.
    record = json.loads(storage.read_text(storage.join(cfg.out_url, RUN_FILE)))
    threshold = record["threshold"]
    assert threshold["value"] == summary.threshold and threshold["negatives"] == threshold["positives"] == ORIGINALS
    assert threshold["false_positive_rate_on_negatives"] <= 0.001
    assert 0 < threshold["recall_on_positives"] <= 1
    assert threshold["copies_failed"] == 0 and threshold["copy_failure"] is None
    by_edit = threshold["recall_by_edit"]
    assert set(by_edit) == {"crop", "rescale", "jpeg"} and sum(e["copies"] for e in by_edit.values()) == ORIGINALS
    assert record["summary"]["clusters"] == summary.clusters == len(by_cluster)


@pytest.mark.ray
def test_every_row_gets_k_neighbours_without_itself_and_a_rerun_does_nothing(planted, planted_run):
    cfg, summary = planted_run
    fs, paths = neighbour_files(cfg.out_url)
    table = pa.concat_tables(pq.read_table(p, filesystem=fs) for p in paths)
    assert sorted(table.column("id").to_pylist()) == sorted(planted["ids"])
    for row in table.to_pylist():
        assert row["error"] is None and len(row["neighbour_ids"]) == 5 and row["id"] not in row["neighbour_ids"]
        assert row["distances"] == sorted(row["distances"])
    again = neighbours(cfg)
    assert again.to_dict() == summary.to_dict()


@pytest.mark.ray
def test_query_by_image_and_by_id(planted, planted_run, tmp_path, capsys):
    from jobs import query as query_job

    cfg, _ = planted_run
    copy_id, data = next(iter(planted["copies"].items()))
    original = copy_id.replace("copy-", "orig-").rsplit("-", 1)[0]
    answers = query(cfg.out_url, planted["model"], images=[data, b"not an image"], k=3)
    assert copy_id == answers[0]["ids"][0] and answers[0]["distances"][0] < 1e-4  # the copy itself is indexed
    assert original in answers[0]["ids"]
    assert answers[1]["ids"] == [] and answers[1]["error"] == "not an image"
    by_id = query(cfg.out_url, ids=[original], k=2)
    assert by_id[0]["query"] == original and original not in by_id[0]["ids"] and copy_id in by_id[0]["ids"]

    image_file = tmp_path / "copy.jpg"
    image_file.write_bytes(data)
    assert query_job.main(["--neighbours", cfg.out_url, "--model", planted["model"], "--image", str(image_file),
                           "--k", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines[0]["query"] == str(image_file) and lines[0]["ids"][0] == copy_id
    assert lines[-1]["queries"] == 1


@pytest.mark.ray
def test_the_report_states_the_recall_on_each_kind_of_edit(planted, planted_run, tmp_path):
    from jobs.report import main as report_main
    from pipeline.report.html import number

    cfg, _ = planted_run
    by_edit = json.loads(storage.read_text(storage.join(cfg.out_url, RUN_FILE)))["threshold"]["recall_by_edit"]
    assert report_main(["--latents", str(planted["root"] / "latents"), "--out", str(tmp_path / "report"),
                        "--neighbours", cfg.out_url]) == 0
    section = json.loads((tmp_path / "report" / "summary.json").read_text())["near_duplicates"]
    assert section["recall_by_edit"] == {kind: got["recall"] for kind, got in by_edit.items()}
    html = (tmp_path / "report" / "index.html").read_text()
    stated = ", ".join(f"{kind} {number(recall, 2)}" for kind, recall in section["recall_by_edit"].items())
    assert f"recall by edit: {stated}" in html


# ---------------------------------------------------------------- the index


def test_ivf_pq_agrees_with_brute_force(tmp_path):
    latents, z, ids = random_latents(tmp_path / "latents", n=4000, dim=32, files=4)
    plan = plan_index(len(z), 32, kind="ivf-pq")
    settings = build_index(latents, str(tmp_path / "out"), plan, target_recall=0.9, record={"latents_url": latents})
    assert settings["kind"] == "ivf-pq" and settings["recall_at_10"] >= 0.9 and settings["nprobe"] >= 1
    search = NeighbourSearch(str(tmp_path / "out"), k=10)
    out = search({"id": np.array(ids), "latent": z})
    position = {i: n for n, i in enumerate(ids)}
    exact = brute_force(z, 10)
    found = [[position[i] for i in row] for row in out.column("neighbour_ids").to_pylist()]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact.tolist())])
    print(f"IVF-PQ recall@10 against numpy brute force: {recall:.3f} (nprobe {settings['nprobe']}, "
          f"measured at build {settings['recall_at_10']:.3f})")
    assert recall >= 0.9
    flat = plan_index(len(z), 32)
    assert flat.kind == "flat" and flat.estimated_bytes() == 4000 * 32 * 4 > plan.estimated_bytes()


def test_int8_latents_give_the_same_neighbours_as_float32(planted, tmp_path):
    """Same neighbours: the same set of 5 nearest, where a neighbour may trade places with one whose
    float32 distance is within 1% of it (a tie int8's rounding can break either way)."""
    found, distances = {}, {}
    for dtype in ("float32", "int8"):
        table = embed_reference(EmbedConfig(data_url=planted["corpus"], model_url=planted["model"], out_url="",
                                            latent_dtype=dtype), 1.0)
        folder = tmp_path / dtype
        folder.mkdir()
        pq.write_table(table, folder / "part-0.parquet")
        build_index(finish(folder), str(tmp_path / f"index-{dtype}"), plan_index(table.num_rows, 32), 0.9, {})
        out = NeighbourSearch(str(tmp_path / f"index-{dtype}"), k=6)(table.to_pydict())
        found[dtype] = dict(zip(out.column("id").to_pylist(), out.column("neighbour_ids").to_pylist()))
        distances[dtype] = dict(zip(out.column("id").to_pylist(), out.column("distances").to_pylist()))
    exact = same = 0
    for row_id, names in found["float32"].items():
        near, sixth = distances["float32"][row_id][:5], distances["float32"][row_id][5]
        exact += set(found["int8"][row_id][:5]) == set(names[:5])
        tied = {n for n, d in zip(names[:5], near) if sixth <= 1.01 * d}  # the 5th and 6th nearly equal
        same += set(found["int8"][row_id][:5]) - set(names[:5]) <= ({names[5]} if tied else set())
    rows = len(found["float32"])
    print(f"int8 vs float32, 5 nearest: the same set for {exact / rows:.3f} of rows, the same up to ties within "
          f"1% for {same / rows:.3f}")
    assert same / rows >= 0.95 and exact / rows >= 0.9


def test_rows_without_a_latent_get_one_row_each_with_the_reason(tmp_path):
    latents, z, ids = random_latents(tmp_path / "latents", n=50, dim=8, files=1, null_rows=(3, 7))
    build_index(latents, str(tmp_path / "out"), plan_index(50, 8), 0.9, {})
    assert LoadedIndex(str(tmp_path / "out")).index.ntotal == 48
    table = pq.read_table(Path(latents) / "part-0000.parquet")
    out = NeighbourSearch(str(tmp_path / "out"), k=4)(table.to_pydict()).to_pylist()
    assert [r["id"] for r in out] == ids
    for n, row in enumerate(out):
        if n in (3, 7):
            assert row["neighbour_ids"] is None and row["distances"] is None
            assert row["error"] == "no latent: not an image"
        else:
            assert row["error"] is None and len(row["neighbour_ids"]) == 4
            assert not {ids[3], ids[7], ids[n]} & set(row["neighbour_ids"])


# ---------------------------------------------------------------- threshold and clusters


def test_calibration_copies_that_fail_are_counted_and_too_many_stop_it(tiny_model, tmp_path, monkeypatch):
    from pipeline.neighbours import calibrate
    from pipeline.shards import Columns, ShardList

    ids = [f"img-{i:02d}" for i in range(40)]
    write_shard(str(tmp_path / "data" / "part-00000.parquet"),
                pa.table({"id": ids, "image": [encode_image(synthetic_image(i, 3, 32, 3)) for i in range(40)]}))
    data, columns = ShardList.under(str(tmp_path / "data")), Columns(id="id", image="image")
    real_copy = calibrate.edited_copy
    unlucky = set()

    def broken_copy(image: bytes, kind, rng, edits):
        if len(unlucky) < failing or image in unlucky:
            unlucky.add(image)
            raise ValueError("a bug in edited_copy")
        return real_copy(image, kind, rng, edits)

    monkeypatch.setattr(calibrate, "edited_copy", broken_copy)
    failing = 1  # 1 of 40: counted, with its cause, and the calibration goes on
    record = calibrate.calibrate_threshold(tiny_model, data, columns, 40, seed=0, latent_dtype="float16")
    assert (record["copies_failed"], record["images_used"]) == (1, 39)
    assert record["copy_failure"] == "ValueError: a bug in edited_copy"
    # Every default edit kind is measured on its share of the copies made, each with its recall.
    by_edit = record["recall_by_edit"]
    assert list(by_edit) == list(DEFAULT_EDITS) and sum(e["copies"] for e in by_edit.values()) == 39
    assert all(e["copies"] >= 7 and 0 <= e["recall"] <= 1 for e in by_edit.values())
    unlucky.clear()
    failing = 40  # every copy: the job stops, naming the cause, instead of calibrating on nothing
    with pytest.raises(JobFailed, match=r"no calibration copy could be made of 40 of the 40 .*a bug in edited_copy"):
        calibrate.calibrate_threshold(tiny_model, data, columns, 40, seed=0, latent_dtype="float16")


def test_threshold_rule_takes_the_lower_of_the_two_limits():
    positives = np.linspace(0.0, 1.0, 101)
    negatives = np.linspace(2.0, 3.0, 1000)
    by_quantile = choose_threshold(positives, negatives, 0.001, 0.99)
    assert by_quantile["value"] == pytest.approx(0.99) and by_quantile["rule"].startswith("positives")
    assert by_quantile["recall_on_positives"] == pytest.approx(100 / 101)
    assert by_quantile["false_positive_rate_on_negatives"] == 0
    overlapping = choose_threshold(positives + 1.5, negatives, 0.001, 0.99)  # copies reach into other images
    assert overlapping["rule"] == "false-positive rate"
    assert overlapping["false_positive_rate_on_negatives"] <= 0.001 < np.mean(negatives <= negatives[1])
    assert overlapping["value"] < negatives[1] and overlapping["recall_on_positives"] == pytest.approx(0.5, abs=0.01)


def test_clusters_are_connected_components_with_the_lowest_mse_kept(tmp_path):
    latents = tmp_path / "latents"
    latents.mkdir()
    pq.write_table(pa.table({"id": list("abcdefg"), "mse": pa.array([0.3, 0.1, 0.2, 0.5, 0.4, None, 0.9],
                                                                      pa.float32())}), latents / "part-0.parquet")
    pairs = pa.table({"id_a": ["a", "b", "d", "f"], "id_b": ["b", "c", "e", "g"],
                      "distance": pa.array([0.1, 0.2, 0.1, 0.3], pa.float32())})
    table = clusters(pairs, str(latents)).to_pylist()
    assert [(r["cluster"], r["id"], r["keeper"], r["size"]) for r in table] == [
        (1, "b", True, 3), (1, "a", False, 3), (1, "c", False, 3),
        (2, "e", True, 2), (2, "d", False, 2),
        (3, "g", True, 2), (3, "f", False, 2)]  # f has no mse: the one with a score is kept


def test_clusters_of_latents_embedded_without_mse_keep_the_first_id(tmp_path):
    """`embed --scores` may leave mse out: the clusters are the same, each keeper its first id."""
    latents = tmp_path / "latents"
    latents.mkdir()
    pq.write_table(pa.table({"id": list("abcde"), "ssim_top": pa.array([0.3, 0.1, 0.2, 0.5, 0.4], pa.float32())}),
                   latents / "part-0.parquet")
    pairs = pa.table({"id_a": ["b", "a", "e"], "id_b": ["c", "b", "d"], "distance": pa.array([0.1, 0.2, 0.1], pa.float32())})
    table = clusters(pairs, str(latents)).to_pylist()
    assert [(r["cluster"], r["id"], r["keeper"], r["mse"]) for r in table] == [
        (1, "a", True, None), (1, "b", False, None), (1, "c", False, None),
        (2, "d", True, None), (2, "e", False, None)]


def test_pairs_under_the_threshold_are_listed_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "neighbour_ids": [["b", "c"], ["a", "c"], None],
                             "distances": pa.array([[0.1, 0.5], [0.1, 0.2], None], pa.list_(pa.float32())),
                             "error": [None, None, "null latent"]}), out / "part-x.parquet")
    (out / "duplicates").mkdir()
    pq.write_table(pa.table({"id_a": ["z"], "id_b": ["zz"], "distance": [0.0]}), out / "duplicates" / "pairs.parquet")
    pairs = duplicate_pairs(str(out), 0.2).to_pylist()
    assert pairs == [{"id_a": "a", "id_b": "b", "distance": pytest.approx(0.1)},
                     {"id_a": "b", "id_b": "c", "distance": pytest.approx(0.2)}]


# ---------------------------------------------------------------- refused before any work


def test_an_unfinished_latent_dataset_is_refused_unless_partial_is_allowed(tmp_path):
    latents, _, _ = random_latents(tmp_path / "latents", n=20, dim=4, files=1)
    os.remove(Path(latents) / SUCCESS_FILE)
    with pytest.raises(InputError, match="not finished .*--allow-partial"):
        prepare(NeighboursConfig(latents_url=latents, out_url=str(tmp_path / "o"), duplicate_threshold="value:1"))
    plan = prepare(NeighboursConfig(latents_url=latents, out_url=str(tmp_path / "o"), duplicate_threshold="value:1",
                                    allow_partial=True))
    plan.lease.release()
    assert plan.latents_record["partial"] and plan.rows_in == 20
    assert plan.partial == f"partial: 20 of an unknown number of rows (the embed job into {latents} never finished)"


def test_an_output_inside_the_latents_of_other_settings_or_in_use_is_refused(tmp_path):
    latents, _, _ = random_latents(tmp_path / "latents", n=20, dim=4, files=1)
    with pytest.raises(InputError, match="is inside --latents"):
        prepare(NeighboursConfig(latents_url=latents, out_url=f"{latents}/nn", duplicate_threshold="value:1"))
    with pytest.raises(InputError, match="holds --latents"):
        prepare(NeighboursConfig(latents_url=latents, out_url=str(tmp_path), duplicate_threshold="value:1"))
    first = prepare(NeighboursConfig(latents_url=latents, out_url=str(tmp_path / "o"), duplicate_threshold="value:1"))
    # One job at a time: a second job into the same folder while the first holds it is refused.
    with pytest.raises(InputError, match="in use by another neighbours job"):
        prepare(NeighboursConfig(latents_url=latents, out_url=str(tmp_path / "o"), duplicate_threshold="value:1"))
    first.lease.release()
    with pytest.raises(InputError, match="other settings .*k"):
        prepare(NeighboursConfig(latents_url=latents, out_url=str(tmp_path / "o"), duplicate_threshold="value:1", k=3))
    with pytest.raises(InputError, match="at least 1,000 rows"):
        prepare(NeighboursConfig(latents_url=latents, out_url=str(tmp_path / "p"), duplicate_threshold="value:1",
                                 index="ivf-pq"))


# ---------------------------------------------------------------- exactly once, S3


def _neighbour_rows(out: str) -> dict[str, tuple]:
    fs, paths = neighbour_files(out)
    table = pa.concat_tables(pq.read_table(p, filesystem=fs) for p in paths)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "a row was written twice"
    return {r["id"]: (tuple(r["neighbour_ids"] or ()), tuple(r["distances"] or ()), r["error"])
            for r in table.to_pylist()}


@pytest.mark.faults  # a kill or a crash mid-job: `make test-faults`
@pytest.mark.ray
@pytest.mark.slow
def test_killed_once_then_rerun_gives_the_uninterrupted_output(ray_local, tmp_path):
    latents, _, _ = random_latents(tmp_path / "latents", n=30_000, dim=32, files=300, null_rows=(5, 17_000),
                                   structured=False)
    args = ["--latents", latents, "--duplicate-threshold", "value:4.5", "--k", "8", "--rows-per-file", "100",
            "--batch-size", "100", "--actors", "1", "--threads", "1"]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jobs.neighbours", *args, "--out", str(out)]
    env = {**os.environ, "RAY_ADDRESS": "local"}

    def written() -> int:  # the neighbour rows (part-*), not index_ids.parquet, written before any of them
        return rows_written(out, prefix="part-")

    kill_part_way(cmd, REPO, env, out, rows=6_000, prefix="part-")
    before = written()
    assert 0 < before < 30_000

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "reusing the index" in second.stdout
    print(f"killed with {before} rows written; the rerun wrote {written() - before}")

    from jobs.neighbours import parse_args

    reference = neighbours(parse_args([*args, "--out", str(tmp_path / "whole")]))
    assert reference.rows_out == 30_000 and reference.rows_without_latent == 2
    killed, whole = _neighbour_rows(str(out)), _neighbour_rows(str(tmp_path / "whole"))
    assert killed.keys() == whole.keys() and len(killed) == 30_000
    assert killed == whole
    for name in (PAIRS_FILE, CLUSTERS_FILE):
        assert pq.read_table(out / name).equals(pq.read_table(tmp_path / "whole" / name))
    assert (out / "_SUCCESS.json").exists()


@pytest.mark.ray
def test_input_and_output_on_s3(ray_local, s3_bucket, tmp_path):
    local, z, ids = random_latents(tmp_path / "latents", n=300, dim=8, files=2, null_rows=(4,))
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(local + "/", f"{s3_bucket[5:]}/latents/", recursive=True)
    cfg = NeighboursConfig(latents_url=f"{s3_bucket}/latents", out_url=f"{s3_bucket}/nn", k=3,
                           duplicate_threshold="value:0.5")
    summary = neighbours(cfg)
    assert (summary.rows_in, summary.rows_out, summary.rows_without_latent) == (300, 300, 1)
    rows = _neighbour_rows(cfg.out_url)
    exact = brute_force(np.delete(z, 4, axis=0), 3)
    kept = [i for n, i in enumerate(ids) if n != 4]
    assert all(rows[i][0] == tuple(kept[j] for j in exact[n]) for n, i in enumerate(kept))
    assert storage.exists(f"{cfg.out_url}/_SUCCESS.json") and storage.exists(f"{cfg.out_url}/index.faiss")
    assert query(cfg.out_url, ids=[ids[0]], k=3)[0]["ids"] == list(rows[ids[0]][0])


# ---------------------------------------------------------------- the report's section


@pytest.mark.ray
def test_report_shows_the_largest_clusters_with_hostile_ids_escaped(ray_local, tiny_model, tmp_path):
    from markupsafe import escape

    from jobs.report import main as report_main

    hostile = ["../x", "<script>alert(1)</script>", "line1\nline2", "q\"uote's & <b>bold</b>"]
    ids = [*hostile, *(f"plain-{i}" for i in range(6))]
    pictures = [synthetic_image(i, 7, SIZE, 3) for i in range(8)]
    # hostile[0] and [1] are one picture, [2] and [3] another: two clusters of exact duplicates.
    images = [encode_image(p) for p in (pictures[0], pictures[0], pictures[1], pictures[1], *pictures[2:])]
    data = tmp_path / "shards"
    write_shard(str(data / "part-00000.parquet"), pa.table({"id": ids, "image": pa.array(images, pa.binary())}))
    # float32: the untrained tiny model maps every picture to nearly one latent, and int8's rounding
    # would bring distinct pictures within this test's 1e-4 of each other.
    table = embed_reference(EmbedConfig(data_url=str(data), model_url=tiny_model, out_url="", latent_dtype="float32"),
                            1.0)
    latents = tmp_path / "latents"
    latents.mkdir()
    pq.write_table(table, latents / "part-0.parquet")
    finish(latents)
    out = tmp_path / "nn"
    summary = neighbours(NeighboursConfig(latents_url=str(latents), out_url=str(out), k=3,
                                          duplicate_threshold="value:0.0001"))
    assert (summary.clusters, summary.rows_in_clusters, summary.rows_to_drop) == (2, 4, 2)

    report_dir = tmp_path / "report"
    assert report_main(["--latents", str(latents), "--out", str(report_dir), "--data", str(data),
                        "--neighbours", str(out), "--top-k", "3"]) == 0
    result = json.loads((report_dir / "summary.json").read_text())
    section = result["near_duplicates"]
    assert section["clusters"] == 2 and section["threshold"] == 0.0001
    assert [sorted(m["id"] for m in c["members"]) for c in section["largest"]] == [sorted(hostile[:2]),
                                                                                   sorted(hostile[2:])]
    assert all(sum(m["keeper"] for m in c["members"]) == 1 for c in section["largest"])
    assert [c["image"] for c in section["largest"]] == ["images/duplicates-0001.png", "images/duplicates-0002.png"]
    strip = np.asarray(Image.open(report_dir / "images" / "duplicates-0001.png"))
    assert strip.shape == (64, 128, 3) and (strip[0, 0] == (40, 170, 60)).all()  # the keeper's frame
    html = (report_dir / "index.html").read_text()
    assert "Near-duplicates" in html and "<script" not in html.lower()
    for name in hostile:
        assert str(escape(name)) in html
    written = {str(p.relative_to(report_dir)) for p in report_dir.rglob("*") if p.is_file()}
    assert written == set(result["files"]) | {f"{LEASE_DIR}/00000000.json"}  # and the record of the report's lease

    # An unfinished neighbours output is refused before any work.
    os.remove(out / "_SUCCESS.json")
    assert report_main(["--latents", str(latents), "--out", str(report_dir), "--neighbours", str(out)]) == 2
