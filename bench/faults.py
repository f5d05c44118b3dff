"""Faults survived: every fault scenario of the test suite, run once more and recorded.

    python bench/faults.py            # every scenario; needs root for the tmpfs
    python bench/faults.py --only for-good,disk-full,node-embed,killed-decode

Runs the scenarios of tests/fault_scenarios.py (the ones tests/test_faults.py and
tests/test_node_faults.py assert on) against a real S3 API (moto's server on 127.0.0.1) behind
the seeded fault proxy of tests/faults.py, a 2 MiB tmpfs, and a multi-raylet local Ray cluster.
Writes docs/bench-results/faults.json (one record per fault and stage: rows in and out,
duplicates, rows lost, reruns, what the failed run said) and prints the Markdown table of
docs/BENCHMARKS.md, "Faults survived".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Before anything imports Ray or s3fs: the jobs and their workers inherit this environment.
S3 = f"http://127.0.0.1:{_free_port()}"
os.environ.update(AWS_ENDPOINT_URL=S3, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1", RAY_DEDUP_LOGS="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")

import fault_scenarios as scenarios  # noqa: E402
from faults import Storm  # noqa: E402

from bench.common import machine, table  # noqa: E402


def _bucket() -> str:
    import boto3

    name = f"faults-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=S3).create_bucket(Bucket=name)
    return f"s3://{name}"


def _tmpfs(where: Path) -> Path:
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], check=True)
    return where


def _attempt(name: str, stage: str, scenario, work: Path) -> list[dict]:
    """The scenario's records, or one record saying how it failed (the table shows it)."""
    try:
        found = scenario(work)
    except Exception as e:  # noqa: BLE001 - recorded with its cause, and the table says FAILED
        return [{"fault": name, "stage": stage, "failed": f"{type(e).__name__}: {str(e)[-2000:]}"}]
    return found if isinstance(found, list) else [found]


def _disk_full(work: Path) -> dict:
    disk = _tmpfs(work / "small-disk")
    try:
        return scenarios.disk_full(disk, work)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


SCENARIOS = {  # name: (what the table calls it, how to run it in a fresh folder)
    "storm": ("S3 storm", lambda work: scenarios.storm_through_every_stage(_bucket(), S3)),
    **{f"killed-{stage}": ("S3 storm, then SIGKILL part way",
                           lambda work, stage=stage: scenarios.killed_in_a_storm(stage, _bucket(), S3, work))
       for stage in scenarios.KILLED_STAGES},
    "for-good": ("S3 PUT failing for good", lambda work: scenarios.failing_for_good(_bucket(), S3, work)),
    "disk-full": ("disk full", _disk_full),
    "node-embed": ("node removed (embed)", scenarios.node_dies_mid_embed),
    "node-train": ("node removed (train)", scenarios.node_dies_mid_training),
}


def run_all(work: Path, names: list[str]) -> list[dict]:
    rows: list[dict] = []
    for name in names:
        title, scenario = SCENARIOS[name]
        (work / name).mkdir()
        rows += _attempt(title, name.removeprefix("killed-"), scenario, work / name)
    return rows


def markdown(rows: list[dict]) -> str:
    def out(row):
        return row["rows_out"] if "rows_out" in row else f"{row['rows_seen']} seen"

    def lost(row):
        if "lost" in row:
            return f"{row['lost']} lost, {row['duplicates']} duplicated"
        return f"epochs {row['epochs']}" if "epochs" in row else f"{row['rows_in'] - row['rows_seen']} unseen"

    def first_run(row):
        """What the first run left: where it was killed, how it failed, or that it finished."""
        if "rows_at_kill" in row:
            where = {"train": "epoch 1 checkpointed", "report": "2 s into its lease"}.get(
                row["stage"], f"{row['rows_at_kill']} rows written")
            return f"killed: {where}, {'finished' if row['finished_at_kill'] else 'unfinished'}"
        if "after_failure" in row:
            failure = row["after_failure"]
            return (f"exit {failure['exit']}, {'a traceback' if failure['traceback'] else 'no traceback'}, "
                    f"{'finished' if failure['finished'] else 'unfinished'}: `{failure['error'][:60]}...`")
        if row.get("first_error"):
            return f"failed: {row['first_error'][:60]}"
        return "finished"

    return table(["fault", "stage", "rows in", "first run", "reruns", "rows out", "finished", "nothing lost"],
                 [[r["fault"], r["stage"], "", "", "", "", "FAILED", r["failed"].splitlines()[0][:120]] if "failed" in r
                  else [r["fault"], r["stage"], r["rows_in"], first_run(r), r["reruns"], out(r),
                        "yes" if r["finished"] else "NO", lost(r)] for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "docs" / "bench-results" / "faults.json"), help="raw results")
    p.add_argument("--only", default=",".join(SCENARIOS), help="scenarios to run, comma-separated (default: all)")
    p.add_argument("--table", action="store_true", help="print the table of the raw results in --out, run nothing")
    args = p.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())["records"]))
        return
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    from moto.server import ThreadedMotoServer

    port = int(S3.rsplit(":", 1)[1])
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    started = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-faults-") as work:
            rows = run_all(Path(work), names)
    finally:
        server.stop()
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - started),
              "scenarios": names, "storm": Storm().to_dict(), "s3_attempts": __import__("pipeline.storage").storage.S3_ATTEMPTS,
              "records": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(markdown(rows))
    print(f"\n{result['machine']}; {result['seconds']} s; raw results: {args.out}")


if __name__ == "__main__":
    main()
