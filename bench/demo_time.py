"""How long `make demo` takes after the install: `squeeze demo` into a fresh folder, timed.

    python bench/demo_time.py                    # one run; --rounds 2 for two
    python bench/demo_time.py --results demo-x   # raw results under another name

Each round runs the same command `make demo` runs (the venv's `squeeze demo`, defaults) in a
child process, into an empty folder that is removed afterwards, so no stage is reused: the
time a person waits after `make venv` on a fresh clone. It records the wall time of the whole
command, each stage's rate as the demo prints it, and the demo's own summary (flags by kind,
AUROC, near-duplicate clusters), so a change that makes the demo faster by doing less shows,
and the seconds between its stage headings, so the time can be laid at a stage's door.
Raw results: docs/bench-results/demo.json (or `--results`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import write_results  # noqa: E402


def one_demo(squeeze: str) -> dict:
    """Run `squeeze demo` into a new temporary folder: its wall seconds, the seconds from each
    stage's heading to the next (Ray's start counts to the first stage that needs it), and its
    JSON summary."""
    out = tempfile.mkdtemp(prefix="demo-time-")
    stages: dict[str, float] = {}
    try:
        start = time.perf_counter()
        errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full stderr pipe would stall the demo
        proc = subprocess.Popen([squeeze, "demo", "--out", out], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=errors, text=True)
        lines, current, since = [], "start", start
        for line in proc.stdout:  # stage headings: "=== 2/5 training (Ray Train) ====="
            lines.append(line)
            if line.startswith("=== "):
                now = time.perf_counter()
                stages[current] = round(now - since, 1)
                current, since = line.strip("= \n"), now
        proc.wait()
        seconds = time.perf_counter() - start
        stages[current] = round(seconds - (since - start), 1)
        errors.seek(0)
        stderr = errors.read()
        errors.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"squeeze demo failed ({proc.returncode}):\n{stderr[-4000:]}")
    summary = json.loads(lines[-1])
    return {"seconds": round(seconds, 1), "stage_seconds": stages, "summary": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1, help="fresh demos to time, one after another")
    p.add_argument("--squeeze", default=str(Path(sys.executable).with_name("squeeze")),
                   help="the squeeze command to run (default: the one beside this Python)")
    p.add_argument("--results", default="demo", help="name of the raw results file under docs/bench-results/")
    args = p.parse_args()
    runs = []
    for round_ in range(args.rounds):
        run = one_demo(args.squeeze)
        runs.append(run)
        print(f"round {round_ + 1}: {run['seconds']:.1f} s; stages {run['stage_seconds']}; "
              f"speed {run['summary'].get('rates')}", flush=True)
    seconds = [run["seconds"] for run in runs]
    median = statistics.median(seconds)
    print(f"`squeeze demo` from nothing: median {median:.1f} s ({median / 60:.1f} min) over {len(runs)} run(s)")
    write_results(args.results, {"command": "squeeze demo --out <empty folder>", "seconds": seconds,
                                 "median_seconds": median, "runs": runs})


if __name__ == "__main__":
    main()
