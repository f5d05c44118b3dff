"""One way to fail: every job, given each kind of bad input, prints one `error:` line and exits 2.

The jobs run in this process through their `main(argv)`, as `python -m jobs.<stage>` would:
a refusal must come from the checks that run before any cluster is needed, so no Ray starts.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builders import write_tar_shards

from pipeline.latents import write_success
from pipeline.synth import write_synthetic_corpus

JOBS = ("synth", "ingest", "train", "embed", "report", "decode", "neighbours", "query", "demo")
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model) -> dict[str, str]:
    """Small real inputs, good and bad, shared by every case."""
    root = tmp_path_factory.mktemp("job-errors")
    shards = root / "shards"
    write_synthetic_corpus(str(shards), n=12, image_size=32, anomaly_fraction=0.0, seed=0, rows_per_shard=6)
    first = pq.read_table(sorted(shards.glob("*.parquet"))[0])
    duplicated = root / "duplicated"
    duplicated.mkdir()
    pq.write_table(first, duplicated / "a.parquet")
    pq.write_table(first.slice(0, 2), duplicated / "b.parquet")
    # A Hugging Face export: an Image feature struct and no id column.
    hub = root / "hub"
    hub.mkdir()
    images = [{"bytes": b, "path": f"img_{i}.png"} for i, b in enumerate(first.column("image").to_pylist())]
    pq.write_table(pa.table({"image": pa.array(images, HF_IMAGE), "label": [0] * len(images)}), hub / "train.parquet")
    not_a_model = root / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text(json.dumps({"hello": "world"}))
    # A latent dataset with the columns the report and decode read, made from no real model.
    latents = root / "latents"
    latents.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "mse": pa.array([0.1, 0.2], pa.float32()),
                             "latent": pa.array([[0.0] * 16, [1.0] * 16], pa.list_(pa.float32(), 16))}),
                   latents / "part-0.parquet")
    write_success(str(latents), {"rows": 2})
    # The same rows, never finished (no success marker), for the stages that refuse unfinished latents.
    unfinished = root / "unfinished-latents"
    unfinished.mkdir()
    pq.write_table(pq.read_table(latents / "part-0.parquet"), unfinished / "part-0.parquet")
    # Output folders that belong to other runs.
    other_run = root / "other-run"
    other_run.mkdir()
    (other_run / "run.json").write_text(json.dumps({"model": {"arch": "plain"}, "val_fraction": 0.5}))
    other_embed = root / "other-embed"
    other_embed.mkdir()
    (other_embed / "_embed.json").write_text(json.dumps({"model_sha256": "0" * 64}))
    truncated = root / "truncated"
    truncated.mkdir()
    whole = (sorted(shards.glob("*.parquet"))[0]).read_bytes()
    (truncated / "part-00000.parquet").write_bytes(whole)
    (truncated / "part-00001.parquet").write_bytes(whole[: len(whole) // 3])  # an upload cut short
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's own file")
    # WebDataset tar shards: keys repeated across shards, one cut short, a prefix mixing formats.
    tar_shards = root / "tars"
    write_tar_shards(tar_shards, 6, shards=1)
    whole_tar = (tar_shards / "00000.tar").read_bytes()
    dup_tars = root / "dup-tars"
    write_tar_shards(dup_tars, 6, shards=1)
    (dup_tars / "00001.tar").write_bytes(whole_tar)
    cut_tar = root / "cut-tar"
    cut_tar.mkdir()
    (cut_tar / "00000.tar").write_bytes(whole_tar[: len(whole_tar) // 2])
    mixed = root / "mixed"
    mixed.mkdir()
    (mixed / "00000.tar").write_bytes(whole_tar)
    pq.write_table(first, mixed / "part-00000.parquet")
    # A Hugging Face export whose image paths repeat: image.path cannot be the id.
    hub_dup = root / "hub-dup"
    hub_dup.mkdir()
    same_path = [{"bytes": b, "path": "img.png"} for b in first.column("image").to_pylist()]
    pq.write_table(pa.table({"image": pa.array(same_path, HF_IMAGE)}), hub_dup / "train.parquet")
    return {"dup_tars": str(dup_tars), "cut_tar": str(cut_tar), "mixed": str(mixed), "hub_dup": str(hub_dup),
            "shards": str(shards), "duplicated": str(duplicated), "hub": str(hub), "model": tiny_model,
            "not_a_model": str(not_a_model), "latents": str(latents), "other_run": str(other_run),
            "other_embed": str(other_embed), "foreign": str(foreign), "truncated": str(truncated),
            "unfinished": str(unfinished), "root": str(root)}


def _out(w: dict[str, str], name: str) -> str:
    return str(Path(w["root"]) / "out" / name)


# (job, kind of bad input, argv from the world, a phrase the error must contain)
CASES = [
    ("synth", "bad value", lambda w: ["--out", _out(w, "s"), "--n", "0"], "must be positive"),
    ("synth", "bad value", lambda w: ["--out", _out(w, "s"), "--anomaly-fraction", "1.5"], "anomaly_fraction"),
    ("ingest", "missing column", lambda w: ["--source", w["hub"], "--out", _out(w, "i"), "--no-ray"], "'id'"),
    ("ingest", "duplicate ids", lambda w: ["--source", w["duplicated"], "--out", _out(w, "i"), "--no-ray"],
     "more than once"),
    ("ingest", "no input", lambda w: ["--source", _out(w, "nothing"), "--out", _out(w, "i"), "--no-ray"],
     "does not exist"),
    ("train", "missing column", lambda w: ["--data", w["hub"], "--out", _out(w, "t")], "'id'"),
    ("train", "missing column", lambda w: ["--data", w["shards"], "--out", _out(w, "t"), "--image-column", "jpg"],
     "'jpg'"),
    ("train", "bad value", lambda w: ["--data", w["shards"], "--out", _out(w, "t"), "--image-size", "33"],
     "image_size"),
    ("train", "bad value", lambda w: ["--data", w["shards"], "--out", _out(w, "t"), "--val-fraction", "1"],
     "val_fraction"),
    ("train", "output folder of another run", lambda w: ["--data", w["shards"], "--out", w["other_run"]],
     "other settings"),
    ("embed", "missing column", lambda w: ["--data", w["hub"], "--model", w["model"], "--out", _out(w, "e")], "'id'"),
    ("embed", "duplicate ids", lambda w: ["--data", w["duplicated"], "--model", w["model"], "--out", _out(w, "e")],
     "more than once"),
    ("embed", "bad threshold spec", lambda w: ["--data", w["shards"], "--model", w["model"], "--out", _out(w, "e"),
                                               "--threshold", "quantile:2"], "quantile"),
    ("embed", "bad threshold spec", lambda w: ["--data", w["shards"], "--model", w["model"], "--out", _out(w, "e"),
                                               "--threshold", "contamination:0.1"], "quantile:Q or value:X"),
    ("embed", "not a checkpoint", lambda w: ["--data", w["shards"], "--model", w["not_a_model"],
                                             "--out", _out(w, "e")], "checkpoint"),
    ("embed", "not a checkpoint", lambda w: ["--data", w["shards"], "--model", w["shards"], "--out", _out(w, "e")],
     "not a checkpoint"),
    ("embed", "output folder of another run", lambda w: ["--data", w["shards"], "--model", w["model"],
                                                         "--out", w["other_embed"]], "another model"),
    ("report", "missing column", lambda w: ["--latents", w["shards"], "--out", _out(w, "r")], "'mse'"),
    ("report", "missing column", lambda w: ["--latents", w["latents"], "--out", _out(w, "r"),
                                            "--label-column", "nope"], "'nope'"),
    ("report", "bad threshold spec", lambda w: ["--latents", w["latents"], "--out", _out(w, "r"),
                                                "--threshold", "median"], "threshold"),
    ("report", "not a checkpoint", lambda w: ["--latents", w["latents"], "--out", _out(w, "r"),
                                              "--model", w["not_a_model"]], "checkpoint"),
    ("decode", "missing column", lambda w: ["--latents", w["shards"], "--model", w["model"], "--out", _out(w, "d")],
     "'latent'"),
    ("decode", "not a checkpoint", lambda w: ["--latents", w["latents"], "--model", w["not_a_model"],
                                              "--out", _out(w, "d")], "checkpoint"),
    ("decode", "output folder of another run", lambda w: ["--latents", w["latents"], "--model", w["model"],
                                                          "--out", w["foreign"]], "not this job's output"),
    ("decode", "missing ids", lambda w: ["--latents", w["latents"], "--model", w["model"], "--out", _out(w, "d"),
                                         "--ids", "ghost"], "'ghost'"),
    ("ingest", "output inside input", lambda w: ["--source", w["shards"], "--out", f"{w['shards']}/x", "--no-ray"],
     "is inside --source"),
    ("train", "output inside input", lambda w: ["--data", w["shards"], "--out", f"{w['shards']}/run"],
     "is inside --data"),
    ("embed", "output inside input", lambda w: ["--data", w["shards"], "--model", w["model"],
                                                "--out", f"{w['shards']}/latents"], "is inside --data"),
    ("embed", "input inside output", lambda w: ["--data", w["shards"], "--model", w["model"],
                                                "--out", str(Path(w["shards"]).parent)], "holds --data"),
    ("report", "output inside input", lambda w: ["--latents", w["latents"], "--out", f"{w['latents']}/report"],
     "is inside --latents"),
    ("decode", "output inside input", lambda w: ["--latents", w["latents"], "--model", w["model"],
                                                 "--out", w["latents"]], "is --latents"),
    ("ingest", "unreadable shard", lambda w: ["--source", w["truncated"], "--out", _out(w, "i"), "--no-ray"],
     "part-00001.parquet is not a readable Parquet file"),
    ("train", "unreadable shard", lambda w: ["--data", w["truncated"], "--out", _out(w, "t")],
     "part-00001.parquet is not a readable Parquet file"),
    ("embed", "unreadable shard", lambda w: ["--data", w["truncated"], "--model", w["model"], "--out", _out(w, "e")],
     "part-00001.parquet is not a readable Parquet file"),
    ("neighbours", "unfinished latents", lambda w: ["--latents", w["unfinished"], "--out", _out(w, "n"),
                                                    "--duplicate-threshold", "value:1"], "not finished"),
    ("neighbours", "bad value", lambda w: ["--latents", w["latents"], "--out", _out(w, "n")],
     "--duplicate-threshold value:X"),
    ("neighbours", "bad value", lambda w: ["--latents", w["latents"], "--out", _out(w, "n"),
                                           "--duplicate-threshold", "median"], "'calibrate' or value:X"),
    ("neighbours", "bad value", lambda w: ["--latents", w["latents"], "--out", _out(w, "n"), "--k", "0",
                                           "--duplicate-threshold", "value:1"], "k must be"),
    ("neighbours", "missing column", lambda w: ["--latents", w["shards"], "--out", _out(w, "n"),
                                                "--allow-partial", "--duplicate-threshold", "value:1"], "'latent'"),
    ("neighbours", "output inside the input", lambda w: ["--latents", w["latents"],
                                                         "--out", w["latents"] + "/nn",
                                                         "--duplicate-threshold", "value:1"], "is inside --latents"),
    ("neighbours", "not a checkpoint", lambda w: ["--latents", w["latents"], "--out", _out(w, "n"),
                                                  "--model", w["not_a_model"], "--data", w["shards"]], "checkpoint"),
    ("neighbours", "tar calibration data", lambda w: ["--latents", w["latents"], "--out", _out(w, "n"),
                                                      "--model", w["model"], "--data", w["dup_tars"]],
     "6 ids occur more than once in column '__key__'"),  # read as embed reads it, and refused as embed does
    ("neighbours", "output folder of another run", lambda w: ["--latents", w["latents"], "--out", w["foreign"],
                                                              "--duplicate-threshold", "value:1"], "not this job's"),
    ("neighbours", "too few rows for IVF-PQ", lambda w: ["--latents", w["latents"], "--out", _out(w, "n2"),
                                                         "--index", "ivf-pq", "--duplicate-threshold", "value:1"],
     "--index flat"),
    ("query", "no index", lambda w: ["--neighbours", w["latents"], "--ids", "a"], "no finished index"),
    ("query", "bad value", lambda w: ["--neighbours", w["latents"]], "--image"),
    ("query", "bad value", lambda w: ["--neighbours", w["latents"], "--image", "x.png"], "--model"),
    ("demo", "bad value", lambda w: ["--out", _out(w, "demo"), "--images", "0"], "images"),
    ("train", "mixed shard formats", lambda w: ["--data", w["mixed"], "--out", _out(w, "t")],
     "mixes shard formats: 1 parquet (part-00000.parquet, ...); 1 tar (00000.tar, ...)"),
    ("embed", "mixed shard formats", lambda w: ["--data", w["mixed"], "--model", w["model"], "--out", _out(w, "e")],
     "mixes shard formats"),
    ("embed", "duplicate tar keys", lambda w: ["--data", w["dup_tars"], "--model", w["model"], "--out", _out(w, "e")],
     "6 ids occur more than once in column '__key__'"),
    ("ingest", "duplicate tar keys", lambda w: ["--source", w["dup_tars"], "--out", _out(w, "i"), "--no-ray"],
     "more than once"),
    ("train", "truncated tar", lambda w: ["--data", w["cut_tar"], "--out", _out(w, "t")],
     "00000.tar is not a readable tar file"),
    ("embed", "truncated tar", lambda w: ["--data", w["cut_tar"], "--model", w["model"], "--out", _out(w, "e")],
     "00000.tar is not a readable tar file"),
    ("report", "truncated tar", lambda w: ["--latents", w["latents"], "--out", _out(w, "r"), "--data", w["cut_tar"]],
     "--data: shard"),
    ("ingest", "truncated tar", lambda w: ["--source", w["cut_tar"], "--out", _out(w, "i"), "--no-ray"],
     "00000.tar is not a readable tar file"),
    ("embed", "duplicate image paths", lambda w: ["--data", w["hub_dup"], "--model", w["model"], "--out", _out(w, "e"),
                                                  "--id-column", "image.path"], "use --id-column @row"),
    ("ingest", "duplicate image paths", lambda w: ["--source", w["hub_dup"], "--out", _out(w, "i"), "--no-ray",
                                                   "--id-column", "image.path"], "'img.png'"),
    ("embed", "missing column, candidates named", lambda w: ["--data", w["hub"], "--model", w["model"],
                                                             "--out", _out(w, "e")], "--id-column image.path"),
]


def test_every_job_is_covered():
    assert {job for job, *_ in CASES} == set(JOBS)


@pytest.mark.parametrize("job,kind,argv,phrase", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_error_line_and_exit_2(world, capsys, monkeypatch, job, kind, argv, phrase):
    def no_cluster() -> None:
        raise AssertionError("a refusal must come before the job connects to Ray")

    monkeypatch.setattr("jobs.cli.connect_ray", no_cluster)
    module = importlib.import_module(f"jobs.{job}")
    code = module.main(argv(world))
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.out[-2000:] + captured.err[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: "), captured.err
    assert phrase in errors[0]
    assert "Traceback" not in captured.out + captured.err
    # The config is printed once, when the arguments made one (a bad value never gets that far).
    assert captured.out.count(f"{job} config: ") == (0 if kind in ("bad value", "bad threshold spec") else 1)


# The stages that write an output folder: (argv of a good run from the world, its prepare, the job's name
# in the lease). The first job's `prepare` holds the folder; a second job into it must be refused.
WRITERS = {
    "synth": (lambda w, out: ["--out", out, "--n", "4", "--image-size", "16"], "pipeline.synth", "synth job"),
    "ingest": (lambda w, out: ["--source", w["shards"], "--out", out, "--no-ray"], "pipeline.ingest", "ingest job"),
    "train": (lambda w, out: ["--data", w["shards"], "--out", out], "pipeline.train", "training job"),
    "embed": (lambda w, out: ["--data", w["shards"], "--model", w["model"], "--out", out], "pipeline.embed",
              "embed job"),
    "neighbours": (lambda w, out: ["--latents", w["latents"], "--out", out, "--duplicate-threshold", "value:1"],
                   "pipeline.neighbours.job", "neighbours job"),
    "report": (lambda w, out: ["--latents", w["latents"], "--out", out, "--threshold", "value:0.15"],
               "pipeline.report.config", "report job"),
    "decode": (lambda w, out: ["--latents", w["latents"], "--model", w["model"], "--out", out], "pipeline.decode",
               "decode job"),
}


def _prepare(module_name: str):
    module = importlib.import_module(module_name)
    return getattr(module, "prepare", None) or module.check_inputs  # the report's prepare is check_inputs


@pytest.mark.parametrize("job", sorted(WRITERS))
def test_a_second_job_into_a_folder_in_use_is_refused_naming_the_first(world, capsys, monkeypatch, job):
    def no_cluster() -> None:
        raise AssertionError("a refusal must come before the job connects to Ray")

    monkeypatch.setattr("jobs.cli.connect_ray", no_cluster)
    argv_of, prepare_module, holder = WRITERS[job]
    argv = argv_of(world, _out(world, f"in-use-{job}"))
    module = importlib.import_module(f"jobs.{job}")
    first = _prepare(prepare_module)(module.parse_args(argv))  # the first job, between its checks and its run
    try:
        code = module.main(argv)
    finally:
        first.lease.release()
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.out[-2000:] + captured.err[-2000:]
    assert len(errors) == 1 and f"is in use by another {holder} (host " in errors[0], captured.err
    assert "Traceback" not in captured.out + captured.err
    _prepare(prepare_module)(module.parse_args(argv)).lease.release()  # released: the folder is free again
