"""The production default end to end: `squeeze demo` (synth -> train -> embed -> report with the
model's default score, `fused`, at the default threshold, `quantile:0.99`) on a small corpus whose
training data holds its anomalies (4%, unlabelled for training), as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
KINDS = {"blot", "colour_shift", "foreign_object", "noise", "scratch"}


@pytest.mark.timeout(600)
def test_the_default_score_and_threshold_flag_few_normal_images_and_most_of_every_kind(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.demo", "--out", str(tmp_path / "demo"), "--images", "800",
                           "--epochs", "4", "--seed", "1"], cwd=REPO, env={**os.environ, "RAY_ADDRESS": "local"},
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows_in"] == result["rows_out"] == 800
    assert result["score"] == "fused"
    # What a person reads: each kind's flag rate, normal images first.
    assert "flag rate    normal " in done.stdout
    rates = result["flag_rate_by_kind"]
    assert set(rates) == KINDS | {"normal"}, rates
    # The targets of the defaults: at most 2% of the 768 normal images flagged, and the anomalies
    # (about 6 a kind here, so one kind's rate moves in steps of 1/6) found: every kind at least
    # half, and the kinds' rates 0.8 or more on average.
    assert rates["normal"] <= 0.02, rates
    assert min(rates[kind] for kind in KINDS) >= 0.5, rates
    assert sum(rates[kind] for kind in KINDS) / len(KINDS) >= 0.8, rates
    assert result["auroc"] >= 0.95, result
    # The neighbours stage ran with the calibration's edits, and the report carries its section.
    from pipeline.neighbours import Edits

    assert set(result["near_duplicate_recall_by_edit"]) == set(Edits.kinds), result
    assert "duplicates   " in done.stdout
    assert "trained without --invariance" in done.stdout  # the demo's model is; the job says what that costs
    index = Path(result["report"]).read_text()
    assert "Near-duplicates" in index and "recall by edit" in index
