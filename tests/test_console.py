"""The `squeeze` command and what the stages print: their own lines, not Ray's chatter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.squeeze import STAGES

REPO = Path(__file__).resolve().parents[1]
SQUEEZE = Path(sys.executable).with_name("squeeze")  # the console script `pip install` made
RAY_LOG_LINE = re.compile(r"\b(INFO|DEBUG)\b .*\.py:\d+ --")  # Ray's logging format
RAY_NOISE = ("Execution plan of Dataset", "Starting execution of Dataset", "Reporting training result",
             "Token authentication is enabled", "has constructor arguments in the object store",
             "exclude_resources", "A new progress UI is available", "Progress bars disabled",
             "Failed to send resource request")


def _squeeze(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # RAY_ADDRESS=local: each stage starts its own local Ray, never the test session's.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    return subprocess.run([str(SQUEEZE), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_squeeze_lists_every_stage_and_their_help_is_the_jobs_own():
    assert SQUEEZE.exists(), "the squeeze console script is installed with the project"
    listed = _squeeze("--help")
    assert listed.returncode == 0
    for stage in STAGES:
        assert re.search(rf"^  {stage}\s+\S", listed.stdout, re.MULTILINE), stage
    for stage in STAGES:
        ours = _squeeze(stage, "--help")
        module = subprocess.run([sys.executable, "-m", f"jobs.{stage}", "--help"], cwd=REPO, capture_output=True,
                                text=True)
        assert ours.returncode == module.returncode == 0
        # The same text; argparse only wraps the usage lines differently for the shorter name.
        assert f"usage: squeeze {stage}" in ours.stdout
        assert ours.stdout.replace(f"squeeze {stage}", f"python -m jobs.{stage}").split() == module.stdout.split()
    unknown = _squeeze("tarin")
    assert unknown.returncode == 2 and "error: unknown stage 'tarin'" in unknown.stderr


def _assert_quiet(result: subprocess.CompletedProcess, stage: str) -> list[str]:
    """The stage ran, printed its config once and its summary last, and no Ray chatter; its lines."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert sum(line.startswith(f"{stage} config: ") for line in lines) == 1
    noisy = [line for line in lines if RAY_LOG_LINE.search(line) or any(n in line for n in RAY_NOISE)]
    assert not noisy, f"{stage} printed Ray's chatter: {noisy[:5]}"
    json.loads(result.stdout.splitlines()[-1])  # the summary, one JSON line, last
    return lines


@pytest.mark.ray
@pytest.mark.slow
def test_stages_through_squeeze_print_their_own_lines_only(tmp_path):
    shards, run, latents, report = (str(tmp_path / name) for name in ("shards", "run", "latents", "report"))
    lines = _assert_quiet(_squeeze("synth", "--out", shards, "--n", "600", "--image-size", "32"), "synth")
    assert any(re.match(r"synth: 600 / 600 images \(100%\)", line) for line in lines)

    lines = _assert_quiet(_squeeze("train", "--data", shards, "--out", run, "--epochs", "3", "--image-size", "32",
                                   "--latent-dim", "16", "--base-width", "8", "--batch-size", "16"), "train")
    for epoch in (1, 2, 3):
        assert sum(line.startswith(f"epoch {epoch}/3 ") for line in lines) == 1, f"epoch {epoch}: {lines}"
    assert any(re.match(r"train: [\d,]+ / ~[\d,]+ images", line) for line in lines)

    lines = _assert_quiet(_squeeze("embed", "--data", shards, "--model", f"{run}/model", "--out", latents), "embed")
    assert any(re.match(r"embed: 600 / 600 rows \(100%\), [\d,]+ rows/s", line) for line in lines)

    lines = _assert_quiet(_squeeze("report", "--latents", latents, "--out", report, "--model", f"{run}/model",
                                   "--data", shards), "report")
    assert any(re.match(r"report pass 1/2: 600 / 600 rows \(100%\)", line) for line in lines)

    neighbours = str(tmp_path / "neighbours")
    lines = _assert_quiet(_squeeze("neighbours", "--latents", latents, "--out", neighbours,
                                   "--duplicate-threshold", "value:0.01"), "neighbours")
    assert any(re.match(r"neighbours: 600 / 600 rows \(100%\), [\d,]+ rows/s", line) for line in lines)
    lines = _assert_quiet(_squeeze("query", "--neighbours", neighbours, "--ids", "synth-00000000"), "query")
    answers = [json.loads(line) for line in lines if line.startswith('{"query"')]
    assert [a["query"] for a in answers] == ["synth-00000000"] and len(answers[0]["ids"]) == 10

    verbose = _squeeze("report", "--latents", latents, "--out", report, "--verbose")
    assert verbose.returncode == 0
    assert RAY_LOG_LINE.search(verbose.stdout + verbose.stderr), "--verbose shows Ray's own logging"
