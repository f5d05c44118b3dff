"""Fault scenarios, each run to its end and described as a record: the fault, the stage, rows
in and out, reruns needed, what was lost. The tests (test_faults.py, test_node_faults.py) assert
on the records; bench/faults.py runs the same scenarios and keeps the records
(docs/bench-results/faults.json, the "Faults survived" table of docs/BENCHMARKS.md).

Every job runs as a user runs it, `python -m jobs.<stage>` in a process of its own with a local
Ray that its workers share the environment of (the S3 endpoint: the fault proxy's), except the
node scenarios, which need the driver connected to a multi-raylet cluster and call the stage
functions in this process.
"""

from __future__ import annotations

import json
import os
import posixpath
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
from builders import kill_when, make_tiny_model, rows_written
from faults import FaultProxy, Storm

from pipeline import storage
from pipeline.synth import write_synthetic_corpus
from pipeline.train import METRICS_FILE

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 480

# Every stage, one after another, in one process (one local Ray for all five). Exits with the
# status of the first stage that fails.
STAGES_SCRIPT = """
import sys
from jobs import decode, embed, neighbours, report, train
root, data = sys.argv[1], sys.argv[2]
stages = [
    (train, ["--data", data, "--out", root + "/run", "--epochs", "1", "--batch-size", "32",
             "--image-size", "32", "--latent-dim", "16", "--base-width", "8", "--val-fraction", "0.25"]),
    (embed, ["--data", data, "--model", root + "/run/model", "--out", root + "/latents",
             "--batch-size", "40", "--rows-per-file", "40", "--actors", "1"]),
    (neighbours, ["--latents", root + "/latents", "--out", root + "/neighbours", "--k", "3",
                  "--model", root + "/run/model", "--data", data, "--calibration-images", "20"]),
    (decode, ["--latents", root + "/latents", "--model", root + "/run/model", "--out", root + "/decoded",
              "--rows-per-file", "40", "--actors", "1"]),
    (report, ["--latents", root + "/latents", "--out", root + "/report", "--model", root + "/run/model",
              "--top-k", "1000", "--typical-k", "0", "--threshold", "contamination:0.05"]),
]
for stage, argv in stages:
    status = stage.main(argv)
    if status:
        sys.exit(status)
"""


def job_env(endpoint: str | None = None) -> dict:
    """This process's environment for a job with a local Ray of its own, the S3 endpoint
    swapped for `endpoint` (the proxy) when given."""
    return {**os.environ, "RAY_ADDRESS": "local", **({"AWS_ENDPOINT_URL": endpoint} if endpoint else {})}


def embed_command(data: str, model: str, out: str) -> list[str]:
    return [sys.executable, "-m", "jobs.embed", "--data", data, "--model", model, "--out", out,
            "--batch-size", "50", "--rows-per-file", "50", "--actors", "1"]


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def ids_of(url: str, prefix: str = "part-") -> list[str]:
    """Every id in the Parquet row files named `prefix`* directly under `url`, repeats kept."""
    fs, root = storage.arrow_filesystem(url)
    files = [storage.filesystem(f)[1] for f in storage.list_files(url)]
    return [i for f in files if posixpath.dirname(f) == root and posixpath.basename(f).startswith(prefix)
            for i in pq.read_table(f, filesystem=fs, columns=["id"]).column("id").to_pylist()]


def record(fault: str, stage: str, ids_in: list[str], ids_out: list[str] | None, finished: bool, reruns: int,
           **more) -> dict:
    """One row of the "Faults survived" table. `ids_out` None: the stage's output is not rows (train)."""
    row = {"fault": fault, "stage": stage, "rows_in": len(ids_in), "finished": finished, "reruns": reruns}
    if ids_out is not None:
        row |= {"rows_out": len(ids_out), "duplicates": len(ids_out) - len(set(ids_out)),
                "lost": len(set(ids_in) - set(ids_out)), "unknown": len(set(ids_out) - set(ids_in))}
    return row | more


def _tail(done: subprocess.CompletedProcess) -> str:
    return done.stdout[-3000:] + done.stderr[-3000:]


def _traceback(done: subprocess.CompletedProcess) -> str:
    """The first traceback on stderr and what came before it (empty when there is none): a failure
    then shows what printed it."""
    start = done.stderr.find("Traceback")
    return "" if start < 0 else done.stderr[max(start - 600, 0):start + 1400]


def _first_error(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    return lines[0] if lines else ""


# --- storage faults through the proxy --------------------------------------------------------


def storm_through_every_stage(bucket: str, upstream: str, n: int = 240, seed: int = 26) -> list[dict]:
    """train, embed, neighbours, decode and report, from S3 to S3, through a seeded storm."""
    data, root = f"{bucket}/shards", f"{bucket}/out"
    write_synthetic_corpus(data, n=n, image_size=32, rows_per_shard=80)
    ids = ids_of(data)
    with FaultProxy(upstream, Storm(seed=seed)) as proxy:
        done = subprocess.run([sys.executable, "-c", STAGES_SCRIPT, root, data], cwd=REPO, env=job_env(proxy.url),
                              capture_output=True, text=True, timeout=2 * JOB_TIMEOUT_S)
    assert done.returncode == 0, _tail(done)
    fault, faults = "S3 storm: 503 SlowDown, 500 InternalError, reset, stall", proxy.faults()
    fs, _ = storage.arrow_filesystem(root)
    top = pq.read_table(storage.filesystem(f"{root}/report/top_anomalies.parquet")[1], filesystem=fs)
    summary = json.loads(storage.read_text(f"{root}/report/summary.json"))
    metrics = json.loads(storage.read_text(f"{root}/run/{METRICS_FILE}").splitlines()[-1])
    return [
        record(fault, "train", ids, None, storage.exists(f"{root}/run/model/config.json"), 0,
               rows_seen=metrics["train_images"] + metrics["val_images"], faults=faults),
        record(fault, "embed", ids, ids_of(f"{root}/latents", prefix=""),
               storage.exists(f"{root}/latents/_SUCCESS.json"), 0),
        record(fault, "neighbours", ids, ids_of(f"{root}/neighbours"),
               storage.exists(f"{root}/neighbours/_SUCCESS.json"), 0),
        record(fault, "decode", ids, ids_of(f"{root}/decoded"), storage.exists(f"{root}/decoded/_decode.json"), 0),
        record(fault, "report", ids, top.column("id").to_pylist(), summary["partial"] is None, 0),
    ]


KILLED_STAGES = ("train", "embed", "neighbours", "decode", "report")


def _stage_command(stage: str, data: str, model: str, latents: str, out: str, n: int) -> list[str]:
    """`python -m jobs.<stage>` as a user runs it, reading `data` (train, embed) or `latents`."""
    tiny = ["--image-size", "32", "--latent-dim", "16", "--base-width", "8"]
    argv = {
        "train": ["--data", data, "--out", out, "--epochs", "3", "--batch-size", "16", "--val-fraction", "0.2",
                  "--workers", "1", *tiny],
        "embed": embed_command(data, model, out)[3:],
        "neighbours": ["--latents", latents, "--out", out, "--k", "3", "--model", model, "--data", data,
                       "--calibration-images", "20", "--rows-per-file", "50"],
        "decode": ["--latents", latents, "--model", model, "--out", out, "--rows-per-file", "50", "--actors", "1"],
        "report": ["--latents", latents, "--out", out, "--model", model, "--top-k", str(n), "--typical-k", "0",
                   "--threshold", "contamination:0.05"],
    }[stage]
    return [sys.executable, "-m", f"jobs.{stage}", *argv]


def _part_way(stage: str, out: str, n: int):
    """When `stage`, writing `out`, is part way: a third of its rows written; for train, epoch 1's
    checkpoint registered; for report (which writes at its end), its lease held for 2 s."""
    if stage == "train":
        snapshot = f"{out}/checkpoints/checkpoint_manager_snapshot.json"
        return lambda: storage.exists(snapshot) and "epoch-0001" in storage.read_text(snapshot)
    if stage == "report":
        since: list[float] = []

        def held_a_while() -> bool:
            if not since and storage.exists(f"{out}/_lease"):
                since.append(time.time())
            return bool(since) and time.time() - since[0] > 2

        return held_a_while
    prefix = "" if stage == "embed" else "part-"
    return lambda: rows_written(out, prefix) >= n * 3 // 10


def _stage_record(fault: str, stage: str, ids: list[str], out: str, reruns: int, **more) -> dict:
    """The record of `stage`'s finished (or not) output folder `out`."""
    if stage == "train":
        history = [json.loads(line) for line in storage.read_text(f"{out}/{METRICS_FILE}").splitlines()]
        return record(fault, stage, ids, None, storage.exists(f"{out}/model/config.json"), reruns,
                      epochs=[m["epoch"] for m in history],
                      rows_seen=history[-1]["train_images"] + history[-1]["val_images"], **more)
    if stage == "report":
        fs, _ = storage.arrow_filesystem(out)
        top = pq.read_table(storage.filesystem(f"{out}/top_anomalies.parquet")[1], filesystem=fs)
        summary = json.loads(storage.read_text(f"{out}/summary.json"))
        return record(fault, stage, ids, top.column("id").to_pylist(), summary["partial"] is None, reruns, **more)
    marker = {"embed": "_SUCCESS.json", "neighbours": "_SUCCESS.json", "decode": "_decode.json"}[stage]
    return record(fault, stage, ids, ids_of(out, prefix="" if stage == "embed" else "part-"),
                  storage.exists(f"{out}/{marker}"), reruns, **more)


def killed_in_a_storm(stage: str, bucket: str, upstream: str, workdir: Path, n: int = 1000, seed: int = 7) -> dict:
    """`stage` from S3 to S3 through a storm, SIGKILLed part way, then the same command again.
    Its inputs (shards, a model, latents) are written beforehand, outside the storm."""
    data, latents, out = f"{bucket}/shards", f"{bucket}/latents", f"{bucket}/{stage}-out"
    write_synthetic_corpus(data, n=n, image_size=32, rows_per_shard=100)
    model = make_tiny_model(str(workdir / "model"))
    if stage in ("neighbours", "decode", "report"):
        made = run(embed_command(data, model, latents), job_env())
        assert made.returncode == 0, _tail(made)
    cmd = _stage_command(stage, data, model, latents, out, n)
    with FaultProxy(upstream, Storm(seed=seed)) as proxy:
        kill_when(cmd, REPO, job_env(proxy.url), _part_way(stage, out, n), timeout=JOB_TIMEOUT_S)
        at_kill = {"rows": rows_written(out, "" if stage == "embed" else "part-"), "faults": proxy.faults(),
                   "finished": any(storage.exists(f"{out}/{name}") for name in
                                   ("_SUCCESS.json", "_decode.json", "summary.json", "model/config.json"))}
        done = run(cmd, job_env(proxy.url))
    assert done.returncode == 0, _tail(done)
    return _stage_record("S3 storm, then SIGKILL part way", stage, ids_of(data), out, 1, rows_at_kill=at_kill["rows"],
                         finished_at_kill=at_kill["finished"], faults_at_kill=at_kill["faults"],
                         faults=proxy.faults())


def failing_for_good(bucket: str, upstream: str, workdir: Path, n: int = 200) -> dict:
    """embed whose Parquet PUTs fail on every attempt; then the same command once storage is well."""
    data, out = f"{bucket}/shards", f"{bucket}/latents"
    write_synthetic_corpus(data, n=n, image_size=32, rows_per_shard=100)
    model = make_tiny_model(str(workdir / "model"))
    prefix = f"/{bucket.removeprefix('s3://')}/latents/"
    with FaultProxy(upstream, fail_for_good=lambda method, path: method == "PUT" and path.startswith(prefix)
                    and path.endswith(".parquet")) as proxy:
        failed = run(embed_command(data, model, out), job_env(proxy.url))
    after_failure = {"exit": failed.returncode, "error": _first_error(failed), "traceback": _traceback(failed),
                     "rows": rows_written(out), "finished": storage.exists(f"{out}/_SUCCESS.json")}
    done = run(embed_command(data, model, out), job_env())
    assert done.returncode == 0, _tail(done)
    return record("S3 PUT failing on every attempt", "embed", ids_of(data), ids_of(out, prefix=""),
                  storage.exists(f"{out}/_SUCCESS.json"), 1, after_failure=after_failure, faults=proxy.faults())


# --- a full disk --------------------------------------------------------------------------------


def disk_full(disk: Path, workdir: Path, n: int = 1000, room: int = 64 * 1024) -> dict:
    """embed into a folder on a small tmpfs filled to `room` bytes; then again once it is freed."""
    data = str(workdir / "shards")
    write_synthetic_corpus(data, n=n, image_size=32, rows_per_shard=100)
    model = make_tiny_model(str(workdir / "model"))
    ballast, out = disk / "ballast", disk / "latents"
    stat = os.statvfs(disk)
    ballast.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - room))
    full = run(embed_command(data, model, str(out)), job_env())
    after_failure = {"exit": full.returncode, "error": _first_error(full), "traceback": _traceback(full),
                     "finished": (out / "_SUCCESS.json").exists()}
    ballast.unlink()
    done = run(embed_command(data, model, str(out)), job_env())
    assert done.returncode == 0, _tail(done)
    return record("disk full (tmpfs)", "embed", ids_of(data), ids_of(str(out), prefix=""),
                  (out / "_SUCCESS.json").exists(), 1, after_failure=after_failure)


# --- a node dies ----------------------------------------------------------------------------------


def _node_of_actor(class_part: str) -> str | None:
    """Node id (hex) of a live actor whose class name holds `class_part`, from the GCS (the
    multi-node cluster has no dashboard for the state API)."""
    import ray._private.state

    for actor in ray._private.state.actors().values():
        if class_part in actor.get("ActorClassName", "") and actor.get("State") == "ALIVE":
            return actor["Address"]["NodeID"]
    return None


class NodeKiller(threading.Thread):
    """Once `ready()` holds, removes the worker node hosting a live actor named `class_part`."""

    def __init__(self, multinode, ready, class_part: str, timeout: float = 300):
        super().__init__(daemon=True)
        self.multinode, self.ready, self.class_part, self.timeout = multinode, ready, class_part, timeout
        self.removed: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.time() + self.timeout
            while time.time() < deadline and self.removed is None:
                node_id = _node_of_actor(self.class_part) if self.ready() else None
                victim = next((n for n in self.multinode.cluster.worker_nodes if n.node_id == node_id), None)
                if victim is not None:
                    self.multinode.cluster.remove_node(victim, allow_graceful=False)
                    self.removed = node_id
                time.sleep(0.2)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
            self.error = e


def _run_while_a_node_dies(job, ready, class_part: str) -> tuple[int, str | None, str | None]:
    """Run `job()` on a head and two 2-CPU worker raylets, removing the worker node of actor
    `class_part` once `ready()`; if the job fails, run it once more. (reruns, first error, node removed)."""
    from cluster_utils import start_multinode_cluster

    reruns, first_error = 0, None
    with start_multinode_cluster(worker_cpus=(2, 2), head_cpus=0) as multinode:
        killer = NodeKiller(multinode, ready, class_part)
        killer.start()
        try:
            job()
        except Exception as e:  # noqa: BLE001 - recorded; the rerun must then finish
            first_error, reruns = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", 1
            job()
        killer.join(timeout=5)
    if killer.error is not None:
        raise killer.error
    return reruns, first_error, killer.removed


def node_dies_mid_embed(workdir: Path, n: int = 1200) -> dict:
    from pipeline.embed import EmbedConfig, embed

    data, out = str(workdir / "shards"), str(workdir / "latents")
    write_synthetic_corpus(data, n=n, image_size=32, rows_per_shard=100)
    model = make_tiny_model(str(workdir / "model"))
    cfg = EmbedConfig(data_url=data, model_url=model, out_url=out, batch_size=50, rows_per_file=50, actors=1)
    reruns, first_error, removed = _run_while_a_node_dies(lambda: embed(cfg), lambda: rows_written(out) >= n // 6,
                                                          "MapWorker")
    return record("worker node removed", "embed", ids_of(data), ids_of(out, prefix=""),
                  storage.exists(f"{out}/_SUCCESS.json"), reruns, first_error=first_error, node_removed=removed)


def node_dies_mid_training(workdir: Path, n: int = 200, epochs: int = 3) -> dict:
    from pipeline.model import AutoencoderConfig
    from pipeline.train import TrainConfig, train

    data, out = str(workdir / "shards"), workdir / "run"
    write_synthetic_corpus(data, n=n, image_size=32, rows_per_shard=50)
    # One CPU per worker, named: sized from the cluster, a worker would ask for 3 of its 4 CPUs,
    # more than any of its 2-CPU nodes has, and wait for ever (see the report of issue 26).
    cfg = TrainConfig(data_url=data, out_url=str(out), workers=1, epochs=epochs, batch_size=16, val_fraction=0.2,
                      cpus_per_worker=1.0,
                      model=AutoencoderConfig(image_size=32, latent_dim=16, base_width=8))
    snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"
    reruns, first_error, removed = _run_while_a_node_dies(
        lambda: train(cfg), lambda: snapshot.exists() and "epoch-0001" in snapshot.read_text(), "RayTrainWorker")
    history = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    return record("worker node removed", "train", ids_of(data), None, (out / "model" / "config.json").exists(),
                  reruns, first_error=first_error, node_removed=removed, epochs=[m["epoch"] for m in history],
                  rows_seen=history[-1]["train_images"] + history[-1]["val_images"])
