"""Every job's command line: help that states each default once, and what parse_args builds."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = ["synth", "ingest", "train", "embed", "neighbours", "query", "report", "decode", "demo"]


@pytest.mark.parametrize("job", JOBS)
def test_help_states_each_default_once_and_never_none(job):
    out = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines anywhere
    assert f"python -m jobs.{job}" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    for option in re.split(r"\s(?=--[a-z])", text):
        assert option.count("default") <= 1, option


def test_embed_options_reach_the_config():
    embed_job = importlib.import_module("jobs.embed")
    cfg = embed_job.parse_args(["--data", "d", "--model", "m", "--out", "o", "--batch-size", "32",
                                "--passthrough", "label,source", "--cpu"])
    assert (cfg.batch_size, cfg.passthrough, cfg.gpu) == (32, ("label", "source"), False)
    assert embed_job.parse_args(["--data", "d", "--model", "m", "--out", "o"]).batch_size is None


def test_demo_summary_gives_each_kind_its_flag_rate_normal_images_first():
    from jobs.demo import flag_rates

    by_kind = [{"kind": "scratch", "flag_rate": 0.75}, {"kind": "", "flag_rate": 0.01},
               {"kind": "blot", "flag_rate": 1.0}, {"kind": "bad", "flag_rate": None}]
    assert list(flag_rates(by_kind).items()) == [("normal", 0.01), ("blot", 1.0), ("scratch", 0.75)]
