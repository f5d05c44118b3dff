"""Report job: metrics equal scikit-learn's, threshold policies, no labels, a real browser, S3, hostile ids.

The browser check drives Debian's headless `chromium` over the Chrome DevTools Protocol
(aiohttp's websocket client, installed with ray[default]): after the load event it evaluates
`document.images` (every image complete with a natural width), counts <script> elements,
reads the page text, watches for JavaScript dialogs, and takes a full-page screenshot that
must not be blank.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
)

from jobs.report import main as report_main
from pipeline import storage
from pipeline.checkpoint import read_checkpoint_meta
from pipeline.embed import EmbedConfig, embed, embed_reference
from pipeline.errors import InputError
from pipeline.images import encode_image
from pipeline.latents import metadata_of, read_latents, write_success
from pipeline.lease import LEASE_DIR
from pipeline.report import (
    HIST_RATIO,
    ReportConfig,
    ScorePartial,
    histogram_counts,
    report,
    report_threshold,
    sketch_quantile,
)
from pipeline.report.galleries import build_galleries
from pipeline.scores import FUSED_FROM
from pipeline.shards import write_shard
from pipeline.synth import synthetic_image, write_synthetic_corpus
from pipeline.thresholds import CONFIDENCE, Calibration, threshold_from_calibration

HOSTILE_IDS = ["../x", "<script>alert(1)</script>", "line1\nline2", "q\"uote's & <b>bold</b>"]
HOSTILE_KIND = "<img src=x onerror=alert(3)>"

LEASE_RECORD = f"{LEASE_DIR}/00000000.json"  # the first job's lease on a folder, kept released


# ---------------------------------------------------------------- builders


def _known_latents(root: Path, labels: bool = True, n: int = 300, seed: int = 0,
                   metadata: dict | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """A latent dataset written directly with pyarrow: known mse, ssim_error, labels, kinds, 2 error rows."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.12).astype(np.int64)
    mse = (rng.gamma(2.0, 0.002, n) + label * rng.gamma(2.0, 0.003, n)).astype(np.float32)
    ssim = np.clip(mse * 9 + rng.normal(0, 0.01, n), 0, 2).astype(np.float32)
    kind = np.where(label == 1, np.where(rng.random(n) < 0.5, "blot", "scratch"), "")
    ids = np.array([f"row-{i:04d}" for i in range(n)])
    error = np.array([None] * n, dtype=object)
    error[[5, 17]] = ["truncated image", "not an image"]
    scored = np.array([e is None for e in error])
    root.mkdir(parents=True, exist_ok=True)
    half = n // 2
    for part, rows in enumerate((slice(0, half), slice(half, n))):
        columns = {"id": pa.array(ids[rows]),
                   "mse": pa.array(mse[rows], mask=~scored[rows]),
                   "ssim_error": pa.array(ssim[rows], mask=~scored[rows]),
                   "is_anomaly": pa.array(mse[rows] > 0.01, mask=~scored[rows]),
                   "error": pa.array(error[rows], pa.string())}
        if labels:
            columns["label"] = pa.array(label[rows])
            columns["anomaly_kind"] = pa.array(kind[rows])
        table = pa.table(columns)
        if metadata is not None:
            table = table.replace_schema_metadata({b"squeeze": json.dumps(metadata).encode()})
        pq.write_table(table, root / f"part-{part}.parquet")
    write_success(str(root), {"rows": n})
    return str(root), {"id": ids[scored], "mse": mse[scored], "ssim": ssim[scored], "label": label[scored],
                       "kind": kind[scored], "scored": scored}


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    return _known_latents(tmp_path_factory.mktemp("known") / "latents",
                          metadata={"threshold": 0.0123, "threshold_spec": "quantile:0.99"})


@pytest.fixture(scope="module")
def model_url(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, model_url, ray_local):
    """A real synthetic corpus (with 2 undecodable rows) embedded by the real embed job."""
    root = tmp_path_factory.mktemp("e2e")
    data = root / "shards"
    write_synthetic_corpus(str(data), n=120, image_size=32, anomaly_fraction=0.1, seed=5, rows_per_shard=60)
    pq.write_table(pa.table({"id": ["bad-junk", "bad-empty"], "image": pa.array([b"junk", b""], pa.binary()),
                             "label": [1, 1], "anomaly_kind": ["bad", "bad"]}), data / "zz-bad.parquet")
    cfg = EmbedConfig(data_url=str(data), model_url=model_url, out_url=str(root / "latents"),
                      passthrough=("label", "anomaly_kind"), batch_size=64)
    summary = embed(cfg)
    assert summary.rows_out == 122
    return cfg


def _summary(out: str) -> dict:
    return json.loads(storage.read_text(storage.join(out, "summary.json")))


# ---------------------------------------------------------------- the browser (CDP)


_CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--remote-debugging-port=0"]
_PAGE_STATE = """JSON.stringify({
  images: Array.from(document.images).map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0})),
  scripts: document.scripts.length,
  text: document.body.innerText,
})"""


async def _browse(url: str, profile: Path, timeout: float = 60.0) -> dict:
    import aiohttp

    proc = subprocess.Popen(["chromium", *_CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"  # chromium writes its port here once it listens
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and "\n" in port_file.read_text()):
            assert proc.poll() is None, "chromium exited before opening its debugging port"
            assert time.monotonic() < deadline, "chromium opened no debugging port"
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                page = next(t for t in await response.json() if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                events: list[dict] = []
                counter = iter(range(1, 1_000_000))

                async def call(method: str, **params) -> dict:
                    call_id = next(counter)
                    await ws.send_json({"id": call_id, "method": method, "params": params})
                    async for message in ws:
                        data = json.loads(message.data)
                        if data.get("id") == call_id:
                            assert "error" not in data, data
                            return data["result"]
                        events.append(data)
                    raise AssertionError("the DevTools connection closed")

                async def loaded() -> None:
                    if any(e.get("method") == "Page.loadEventFired" for e in events):
                        return
                    async for message in ws:
                        events.append(json.loads(message.data))
                        if events[-1].get("method") == "Page.loadEventFired":
                            return

                await call("Page.enable")
                await call("Runtime.enable")
                await call("Page.navigate", url=url)
                await asyncio.wait_for(loaded(), timeout)
                state = json.loads((await call("Runtime.evaluate", expression=_PAGE_STATE,
                                                returnByValue=True))["result"]["value"])
                shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
                state["screenshot"] = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("L")
                state["dialogs"] = [e for e in events if e.get("method") == "Page.javascriptDialogOpening"]
                state["exceptions"] = [e for e in events if e.get("method") == "Runtime.exceptionThrown"]
                return state
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def browse(index_html: Path, tmp_path: Path) -> dict:
    if shutil.which("chromium") is None:
        message = "Debian's chromium is not installed (apt-get install -y chromium; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI a missing browser is a broken setup, never a skip
        pytest.skip(message)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    return asyncio.run(_browse(index_html.resolve().as_uri(), profile))


def _assert_renders(state: dict, expected_images: int) -> None:
    assert len(state["images"]) == expected_images, [i["src"] for i in state["images"]]
    assert all(i["ok"] for i in state["images"]), [i["src"] for i in state["images"] if not i["ok"]]
    assert state["scripts"] == 0 and not state["dialogs"] and not state["exceptions"]
    pixels = np.asarray(state["screenshot"], dtype=np.float32)
    assert pixels.shape[0] > 1000, "the screenshot should hold the whole (long) page"
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.02, "the screenshot is blank"


class _Tags(HTMLParser):
    """Every tag and attribute the HTML parser sees, to find what escaping should have prevented."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


# ---------------------------------------------------------------- aggregation, metrics, thresholds


@pytest.mark.ray
def test_metrics_counts_and_quantiles_equal_the_reference(ray_local, known, tmp_path):
    latents, truth = known
    threshold = 0.009
    summary = report(ReportConfig(latents_url=latents, out_url=str(tmp_path / "r"), threshold=f"value:{threshold}",
                                  top_k=20))
    y, s = truth["label"], truth["mse"].astype(np.float64)
    m = summary["metrics"]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["average_precision"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    precision, recall, cuts = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    assert m["best_f1"] == pytest.approx(f1[:-1].max(), abs=1e-12)
    assert m["best_f1_threshold"] == pytest.approx(cuts[np.argmax(f1[:-1])])
    assert m["by_score"]["ssim_error"]["auroc"] == pytest.approx(roc_auc_score(y, truth["ssim"]), abs=1e-12)
    flagged = (s > threshold).astype(int)
    assert m["at_threshold"]["confusion_matrix"] == confusion_matrix(y, flagged).tolist()
    assert (m["positives"], m["negatives"], m["sampled"]) == (int(y.sum()), int((1 - y).sum()), False)

    counts = summary["counts"]
    assert (counts["rows"], counts["scored_rows"], counts["error_rows"]) == (300, 298, 2)
    assert counts["errors_by_reason"] == {"not an image": 1, "truncated image": 1}
    assert summary["threshold"]["flagged_rows"] == int(flagged.sum())
    assert counts["embed_flagged_rows"] == int((s > 0.01).sum())
    for q, value in summary["scores"]["mse"]["quantiles"].items():
        assert value == pytest.approx(np.quantile(s, float(q)), rel=1e-6)
    assert summary["scores"]["quantile_method"] == "exact"
    assert sorted((r["shard"], r["rows"], r["error_rows"]) for r in summary["shards"]) == [
        ("part-0.parquet", 150, 2), ("part-1.parquet", 150, 0)]
    kinds = {k["kind"]: k for k in summary["by_kind"]}
    assert kinds["blot"]["flagged_rows"] == int(((truth["kind"] == "blot") & (s > threshold)).sum())
    assert sum(k["scored_rows"] for k in kinds.values()) == 298

    order = np.lexsort((truth["id"], -s))[:20]
    top = pq.read_table(tmp_path / "r" / "top_anomalies.parquet")
    assert top.column("id").to_pylist() == truth["id"][order].tolist()
    assert top.column("rank").to_pylist() == list(range(1, 21))
    assert top.column("label").to_pylist() == y[order].tolist()
    assert summary["histogram"]["counts"] and sum(summary["histogram"]["counts"]) == 298
    assert sum(summary["histogram"]["counts_label_1"]) == int(y.sum())
    html = (tmp_path / "r" / "index.html").read_text()
    assert 'id="metrics"' in html and "AUROC" in html

    # Above max_exact_rows: histogram quantiles within the stated factor, sampled metrics,
    # and still exact counts and confusion matrix.
    sampled = report(ReportConfig(latents_url=latents, out_url=str(tmp_path / "s"), threshold=f"value:{threshold}",
                                  max_exact_rows=150))
    assert sampled["scores"]["quantile_method"] == "histogram"
    assert sampled["metrics"]["sampled"] and 60 < sampled["metrics"]["rows_used"] < 240
    assert sampled["metrics"]["at_threshold"] == m["at_threshold"]
    assert sampled["threshold"]["flagged_rows"] == summary["threshold"]["flagged_rows"]
    ordered = np.sort(s)
    for q, value in sampled["scores"]["mse"]["quantiles"].items():
        rank = float(q) * (len(s) - 1)
        lower, upper = ordered[math.floor(rank)], ordered[math.ceil(rank)]
        assert lower / HIST_RATIO <= value <= upper * HIST_RATIO, q


def test_sketch_quantiles_stay_within_the_stated_factor():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.lognormal(-6, 1.5, 20_000), [0.0, 3e-10, 1.0]])
    counts = histogram_counts(values)
    ordered = np.sort(values)
    for q in (0.0, 0.001, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0):
        value = sketch_quantile(counts, q, ordered[0], ordered[-1])
        rank = q * (len(values) - 1)
        lower, upper = ordered[math.floor(rank)], ordered[math.ceil(rank)]
        assert min(lower, 1e-9) / HIST_RATIO <= value <= max(upper, 1e-9) * HIST_RATIO, (q, value, lower, upper)


def test_sketch_quantiles_of_a_z_score_hold_below_zero_and_above_two():
    """`fused` is a z-score: most rows near or below 0, anomalies far above 2. Its quantiles
    read off the sketch stay within the stated factor on both sides of zero."""
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(0.0, 1.0, 19_000), rng.uniform(3.0, 400.0, 1_000)])
    counts = histogram_counts(values)
    assert counts[0] == counts[-1] == 0  # nothing folded into under- or overflow
    ordered = np.sort(values)
    for q in (0.0, 0.01, 0.3, 0.5, 0.9, 0.95, 0.99, 1.0):
        value = sketch_quantile(counts, q, ordered[0], ordered[-1])
        rank = q * (len(values) - 1)
        lower, upper = ordered[math.floor(rank)], ordered[math.ceil(rank)]
        band = [bound * factor for bound in (lower, upper) for factor in (HIST_RATIO, 1 / HIST_RATIO)]
        assert min(band) - 1e-6 <= value <= max(band) + 1e-6, (q, value, lower, upper)


def test_histogram_bars_are_symlog_for_scores_around_zero_and_log_for_positive_ones():
    from pipeline.report.figures import histogram_figure
    from pipeline.report.sketch import histogram_bars

    rng = np.random.default_rng(3)
    z = np.concatenate([rng.normal(0.0, 1.0, 950), rng.uniform(3.0, 60.0, 50)])
    bars = histogram_bars(histogram_counts(z), {1: histogram_counts(z[950:])})
    assert bars["scale"] == "symlog" and 1.5 < bars["linthresh"] < 2.5
    assert sum(bars["counts"]) == 1000 and sum(bars["counts_label_1"]) == 50
    edges = np.asarray(bars["edges"])
    assert np.all(np.diff(edges) > 0) and edges[0] <= z.min() and edges[-1] >= z.max()
    # Neither squeezed into a few bars (a linear axis to 60) nor piled into the first one (the
    # log sketch before, where every score <= 1e-9 landed): the bulk spreads over many bars.
    assert max(bars["counts"]) < 0.08 * len(z) and sum(c > 5 for c in bars["counts"]) >= 20, bars["counts"]
    positive = histogram_bars(histogram_counts(rng.lognormal(-6, 1.5, 1000)))
    assert positive["scale"] == "log" and positive["edges"][0] > 0 and sum(positive["counts"]) == 1000
    png = histogram_figure(bars, "fused (symlog scale)", threshold=2.5)
    assert png.startswith(b"\x89PNG")


@pytest.mark.ray
def test_contamination_flags_exactly_the_top_share(ray_local, known, tmp_path):
    latents, truth = known
    summary = report(ReportConfig(latents_url=latents, out_url=str(tmp_path / "r"), threshold="contamination:0.05",
                                  top_k=40, typical_k=5))
    k = round(0.05 * 298)
    t = summary["threshold"]
    assert (t["policy"], t["flagged_rows"]) == ("contamination", k)
    assert t["flagged_share"] == pytest.approx(k / 298)
    top = pq.read_table(tmp_path / "r" / "top_anomalies.parquet")
    assert top.column("flagged").to_pylist() == [True] * k + [False] * (40 - k)
    # The typical rows are the ones nearest the median.
    median = np.median(truth["mse"].astype(np.float64))
    nearest = truth["id"][np.argsort(np.abs(truth["mse"] - median), kind="stable")[:5]]
    assert [r["id"] for r in summary["typical_rows"]] == nearest.tolist()
    assert summary["galleries"] is None
    assert "galleries omitted" in (tmp_path / "r" / "index.html").read_text()


def test_threshold_policies_resolve_from_their_sources(model_url, tmp_path):
    calibration = read_checkpoint_meta(model_url)["training"]["calibration"]
    empty = ScorePartial()
    from_model = report_threshold("quantile:0.95", empty, True, calibration, None)
    assert from_model.value == pytest.approx(threshold_from_calibration(calibration, 0.95))
    assert "--model" in from_model.source
    # The calibration's estimate of how much of its held-out split was anomalous travels along.
    assert from_model.estimated_contamination == Calibration.from_dict(calibration).get("mse").contamination
    recorded = {"threshold": 0.0123, "threshold_spec": "quantile:0.99"}
    assert report_threshold("quantile:0.99", empty, True, None, recorded).value == 0.0123
    # Another quantile than the embed job's: the calibration of the model the metadata names.
    named = report_threshold("quantile:0.9", empty, True, None, {**recorded, "model": model_url})
    assert named.value == pytest.approx(threshold_from_calibration(calibration, 0.9))
    with pytest.raises(InputError, match="needs the model's calibration"):
        report_threshold("quantile:0.9", empty, True, None, recorded)
    # A named model that cannot be read is named, with the cause, not taken for "no calibration".
    (tmp_path / "broken").mkdir()
    with pytest.raises(InputError, match=f"the model {tmp_path / 'broken'} named in the latent metadata cannot be read"):
        report_threshold("quantile:0.9", empty, True, None, {**recorded, "model": str(tmp_path / "broken")})
    assert report_threshold("value:0.5", empty, True, None, None).estimated_contamination is None
    assert report_threshold("value:0.5", empty, True, None, None).uncertainty is None
    # A score of scores names the parts its calibration fuses (train --fuse); a single score none.
    assert from_model.parts is None and report_threshold("value:0.5", empty, True, None, None, "fused").parts is None
    assert report_threshold("quantile:0.99", empty, True, calibration, None, "fused").parts == FUSED_FROM
    chosen = {**calibration, "fused_from": ["mse", "patch_knn_max"]}
    assert report_threshold("value:2", empty, True, chosen, None, "fused").parts == ("mse", "patch_knn_max")
    assert from_model.uncertainty["point_estimate"] < from_model.value
    for bad in ("quantile:1.5", "contamination:-0.1", "value:abc", "median", "value:nan"):
        with pytest.raises(InputError, match="threshold|contamination|quantile"):
            report_threshold(bad, empty, True, None, None)


@pytest.mark.ray
def test_no_label_column_means_no_metric_sections(ray_local, tmp_path):
    latents, _ = _known_latents(tmp_path / "latents", labels=False, n=80)
    out = tmp_path / "r"
    # Left by an earlier report with labels and galleries: ours goes, anything else stays.
    (out / "images").mkdir(parents=True)
    for stale in ("roc_pr.png", "images/worst-0099-error.png", "notes.txt", "images/mine.png"):
        (out / stale).write_bytes(b"old")
    summary = report(ReportConfig(latents_url=latents, out_url=str(out), threshold="contamination:0.1"))
    assert not (out / "roc_pr.png").exists() and not (out / "images" / "worst-0099-error.png").exists()
    assert (out / "notes.txt").exists() and (out / "images" / "mine.png").exists()
    assert "metrics" not in summary and "by_kind" not in summary and "metrics" not in _summary(str(out))
    assert "histogram_label_1" not in summary["histogram"] and "counts_label_1" not in summary["histogram"]
    html = (out / "index.html").read_text()
    assert 'id="metrics"' not in html and "AUROC" not in html and "roc_pr.png" not in html
    assert summary["threshold"]["flagged_rows"] == 8
    assert "label" not in pq.read_table(out / "top_anomalies.parquet").column_names


def _without(latents: str, out: Path, dropped: tuple[str, ...], renamed: dict[str, str]) -> str:
    """A copy of a latent dataset with some score columns dropped and others renamed (as an embed
    run with other --scores writes it)."""
    out.mkdir(parents=True)
    for path in sorted(Path(latents).glob("*.parquet")):
        table = pq.read_table(path).drop_columns(list(dropped))
        pq.write_table(table.rename_columns([renamed.get(n, n) for n in table.column_names]), out / path.name)
    write_success(str(out), {})
    return str(out)


@pytest.mark.ray
def test_a_report_reads_whatever_scores_are_there_and_names_a_missing_one(ray_local, known, tmp_path):
    latents, truth = known
    only_ssim = _without(latents, tmp_path / "ssim-only", ("mse",), {"ssim_error": "ssim_top"})
    with pytest.raises(InputError, match=r"--score mse needs the score\(s\) mse, which .*ssim-only does not "
                                         r"have \(it has: ssim_top\).*--scores"):
        report(ReportConfig(latents_url=only_ssim, out_url=str(tmp_path / "refused")))
    with pytest.raises(InputError, match=r"--score gms_top needs the score\(s\) gms_top.*it has: mse, ssim_error"):
        report(ReportConfig(latents_url=latents, out_url=str(tmp_path / "refused"), score="gms_top"))
    assert not (tmp_path / "refused").exists()
    summary = report(ReportConfig(latents_url=only_ssim, out_url=str(tmp_path / "r"), score="ssim_top",
                                  threshold="contamination:0.1"))
    assert summary["threshold"]["score"] == "ssim_top"
    assert "ssim_top" in summary["scores"] and "mse" not in summary["scores"]
    assert summary["scores"]["ssim_top"]["max"] == pytest.approx(float(truth["ssim"].max()))


@pytest.mark.ray
def test_the_threshold_of_the_fused_score_says_what_it_fuses(ray_local, known, model_url, tmp_path):
    latents, _ = known
    fused = _without(latents, tmp_path / "fused", ("ssim_error",), {"mse": "fused"})
    summary = report(ReportConfig(latents_url=fused, out_url=str(tmp_path / "r"), model_url=model_url, score="fused"))
    parts = read_checkpoint_meta(model_url)["training"]["calibration"]["fused_from"]
    assert summary["threshold"]["parts"] == parts == list(FUSED_FROM)
    html = (tmp_path / "r" / "index.html").read_text()
    assert "<th>fused from</th><td>the largest robust z of <code>mse</code>, <code>ssim_top</code>, " \
           "<code>stem_knn</code>" in html


def test_bad_input_exits_2_with_a_clear_message(known, tmp_path, capsys):
    latents, _ = known
    cases = [
        (["--latents", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], "no latent dataset"),
        (["--latents", latents, "--out", str(tmp_path / "o"), "--threshold", "top:5"], "--threshold must be"),
        (["--latents", latents, "--out", str(tmp_path / "o"), "--label-column", "is_bad"], "'is_bad' is not a column"),
        (["--latents", latents, "--out", str(tmp_path / "o"), "--threshold", "quantile:0.5"],
         "needs the model's calibration"),
        (["--latents", latents, "--out", str(tmp_path / "o"), "--interpolate", "row-0001,row-0002"],
         "--interpolate needs --model"),
    ]
    for argv, message in cases:
        assert report_main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "o").exists(), "a refused report writes nothing"


# ---------------------------------------------------------------- end to end, in a browser


@pytest.mark.ray
def test_end_to_end_report_renders_in_chromium(ray_local, embedded, model_url, tmp_path):
    out = tmp_path / "report"
    argv = ["--latents", embedded.out_url, "--out", str(out), "--model", model_url, "--data", embedded.data_url,
            "--top-k", "12", "--typical-k", "4", "--interpolate", "synth-00000000,synth-00000001",
            "--interpolation-steps", "6"]
    assert report_main(argv) == 0
    summary = _summary(str(out))
    calibration = read_checkpoint_meta(model_url)["training"]["calibration"]
    assert summary["threshold"]["value"] == pytest.approx(threshold_from_calibration(calibration, 0.99))
    contamination = Calibration.from_dict(calibration).get("mse").contamination
    assert summary["threshold"]["estimated_contamination"] == contamination
    # The threshold states its uncertainty: an upper bound above the bulk's fitted quantile.
    fitted = Calibration.from_dict(calibration).get("mse")
    uncertainty = summary["threshold"]["uncertainty"]
    assert uncertainty["held_out"] == fitted.count and uncertainty["confidence"] == CONFIDENCE
    assert uncertainty["point_estimate"] == pytest.approx(fitted.estimate(0.99))
    assert uncertainty["point_estimate"] < summary["threshold"]["value"]
    assert summary["counts"]["rows"] == 122 and summary["counts"]["error_rows"] == 2
    latents = read_latents(embedded.out_url, columns=["id", "mse", "label"]).to_pylist()
    scored = sorted((r for r in latents if r["mse"] is not None), key=lambda r: (-r["mse"], r["id"]))
    assert [r["id"] for r in summary["top_anomalies"]] == [r["id"] for r in scored[:12]]
    assert summary["threshold"]["flagged_rows"] == sum(r["mse"] > summary["threshold"]["value"] for r in scored)
    assert {k["kind"] for k in summary["by_kind"]} == {"", "bad", "scratch", "blot", "noise", "colour_shift",
                                                       "foreign_object"}
    worst, typical = summary["galleries"]["worst"], summary["galleries"]["typical"]
    assert len(worst) == 12 and len(typical) == 4
    # Reconstructed at the embed job's precision ("auto" resolves per machine), which the latents record.
    assert summary["galleries"]["precision"] == metadata_of(read_latents(embedded.out_url).schema)["precision"]
    for entry in worst + typical:
        # Fetched by id from the shards and reconstructed by the same model: the same score.
        assert entry["recomputed_mse"] == pytest.approx(entry["mse"], rel=1e-4, abs=1e-7)
        for name in entry["images"].values():
            assert Image.open(out / name).size == (32, 32)
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == set(summary["files"]) | {LEASE_RECORD}  # the report's files, and the record of its lease
    assert {"index.html", "summary.json", "top_anomalies.parquet", "histogram_mse.png", "roc_pr.png",
            "interpolation.png"} <= files

    # pipeline/inference.py's interpolation_grid: six decoded 32x32 images side by side.
    assert Image.open(out / "interpolation.png").size == (6 * 32, 32)
    assert summary["interpolation"] == {"id_a": "synth-00000000", "id_b": "synth-00000001", "steps": 6,
                                        "image": "interpolation.png"}

    state = browse(out / "index.html", tmp_path)
    _assert_renders(state, expected_images=3 * (12 + 4) + 3)  # galleries, histogram, ROC/PR, strip
    assert "AUROC" in state["text"] and worst[0]["id"] in state["text"]
    shown = state["text"].split("estimated contamination", 1)[1].split("\n", 1)[0]
    assert f"{100 * contamination:.3g}% of the model's held-out images" in shown


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_gallery_scores_are_recomputed_at_the_precision_the_embed_job_ran(tiny_trained_model, precision):
    """A gallery's recomputed_mse is the row's mse whichever precision embed ran at: on a machine
    where "auto" picks bfloat16, a float32 recomputation would differ in the third digit."""
    import torch

    from pipeline.images import decode_batch
    from pipeline.inference import ImageScorer, load_inference_model, to_input

    ids = [f"img-{i}" for i in range(10)]
    encoded = {i: encode_image(synthetic_image(n, 3, 32, 3)) for n, i in enumerate(ids)}
    model, checkpoint = load_inference_model(tiny_trained_model)
    pixels, _ = decode_batch([encoded[i] for i in ids], checkpoint.config.image_size, checkpoint.config.channels, "pad")
    x = to_input(torch.from_numpy(np.stack(pixels)))
    embedded = {p: ImageScorer(model, scores=("mse",), precision=p)(x)["scores"]["mse"]
                for p in ("float32", "bfloat16")}
    assert not np.allclose(embedded["float32"], embedded["bfloat16"], rtol=1e-5, atol=0), \
        "bfloat16 gives float32's scores: the check below could not tell them apart"
    entries, _, _, _ = build_galleries(tiny_trained_model, encoded, {"worst": [{"id": i} for i in ids]}, [], "mse",
                                       precision)
    recomputed = [entry["recomputed_mse"] for entry in entries["worst"]]
    assert recomputed == pytest.approx(embedded[precision].tolist(), rel=1e-5, abs=1e-8)


@pytest.mark.ray
def test_report_written_to_s3(ray_local, s3_bucket, embedded, model_url):
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(embedded.out_url + "/", f"{s3_bucket[5:]}/latents/", recursive=True)
    out = f"{s3_bucket}/reports/r1"
    summary = report(ReportConfig(latents_url=f"{s3_bucket}/latents", out_url=out, model_url=model_url,
                                  data_url=embedded.data_url, top_k=3, typical_k=1))
    again = _summary(out)
    assert again["counts"] == summary["counts"] and again["counts"]["rows"] == 122
    written = sorted(p[len(f"{s3_bucket[5:]}/reports/r1/"):] for p in fs.find(f"{s3_bucket[5:]}/reports/r1"))
    assert written == sorted([*again["files"], LEASE_RECORD])
    html = storage.read_text(f"{out}/index.html")
    sources = re.findall(r'<img[^>]* src="([^"]+)"', html)
    assert len(sources) == 3 * 4 + 2 and all(storage.exists(f"{out}/{s}") for s in sources)  # galleries, histogram, ROC/PR
    assert pq.read_table(fs.open(f"{s3_bucket[5:]}/reports/r1/top_anomalies.parquet")).num_rows == 3


# ---------------------------------------------------------------- untrusted data


@pytest.mark.ray
def test_hostile_ids_stay_text_and_write_only_inside_the_report(ray_local, model_url, tmp_path, monkeypatch):
    data = tmp_path / "sh\"ards'<script>"
    ids = [*HOSTILE_IDS, *(f"plain-{i}" for i in range(6))]
    images = [encode_image(synthetic_image(i, 7, 32, 3, kind="blot" if i < 2 else "")) for i in range(len(ids))]
    write_shard(str(data / "part-00000.parquet"), pa.table({
        "id": ids, "image": pa.array(images, pa.binary()), "label": [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        "anomaly_kind": [HOSTILE_KIND, HOSTILE_KIND, *[""] * 8]}))
    cfg = EmbedConfig(data_url=str(data), model_url=model_url, out_url="unused",
                      passthrough=("label", "anomaly_kind"))
    table = embed_reference(cfg, threshold=0.01)
    latents = tmp_path / "lat<img src=x onerror=alert(2)>"
    latents.mkdir()
    pq.write_table(table, latents / "part-0.parquet")
    write_success(str(latents), {"rows": table.num_rows})

    strip = np.random.default_rng(0).integers(0, 256, (32, 32 * 5, 3), dtype=np.uint8)
    calls = []

    def interpolation_grid(model: str, latents_url: str, id_a: str, id_b: str, steps: int = 8) -> np.ndarray:
        calls.append((model, latents_url, id_a, id_b, steps))
        return strip

    # A stand-in with pipeline.inference's signature: this test is about what the report does with the ids and
    # the strip (the end-to-end test above runs the real one).
    monkeypatch.setattr("pipeline.inference.interpolation_grid", interpolation_grid)

    out = tmp_path / "report"
    before = {p for p in tmp_path.rglob("*")}
    summary = report(ReportConfig(latents_url=str(latents), out_url=str(out), model_url=model_url, data_url=str(data),
                                  top_k=20, typical_k=2, interpolate=(HOSTILE_IDS[1], HOSTILE_IDS[0]),
                                  interpolation_steps=5))
    created = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    print("files written:", sorted(str(p.relative_to(out)) for p in created))
    assert all(out in p.parents for p in created), [str(p) for p in created if out not in p.parents]
    assert {str(p.relative_to(out)) for p in created} == set(summary["files"]) | {LEASE_RECORD}
    allowed = re.compile(r"^(images/(worst|typical)-\d{4}-(original|reconstruction|error)\.png|[a-z_]+\.(png|json|html"
                         r"|parquet))$")
    assert all(allowed.match(name) for name in summary["files"]), summary["files"]
    assert calls == [(model_url, str(latents), HOSTILE_IDS[1], HOSTILE_IDS[0], 5)]
    assert np.array_equal(np.asarray(Image.open(out / "interpolation.png")), strip)

    html = (out / "index.html").read_text()
    assert "<script" not in html.lower()
    parser = _Tags()
    parser.feed(html)
    assert not [t for t, a in parser.tags if t == "script" or any(k.startswith("on") for k in a)]
    assert {a.get("src") for t, a in parser.tags if t == "img"} <= set(summary["files"])
    for hostile in [*HOSTILE_IDS, HOSTILE_KIND]:
        assert _escaped(hostile) in html
    assert {r["id"] for r in summary["top_anomalies"]} == set(ids)

    state = browse(out / "index.html", tmp_path)
    _assert_renders(state, expected_images=3 * (10 + 2) + 3)  # galleries, histogram, ROC/PR, strip
    for hostile in HOSTILE_IDS:  # shown as text, exactly (the newline kept by white-space: pre-wrap)
        assert hostile in state["text"]
    assert HOSTILE_KIND in state["text"]


def _escaped(text: str) -> str:
    """`text` as the report's template engine writes it (Jinja2's autoescape is markupsafe's escape)."""
    from markupsafe import escape

    return str(escape(text))


def test_block_reducers_run_without_ray_even_on_a_block_of_undecodable_rows():
    """The per-block functions are plain functions of a pyarrow table (what Ray Data hands them)."""
    from pipeline.report import (
        PATH_COLUMN,
        GroupStats,
        ScanPlan,
        scan_flags,
        scan_scores,
        unpack,
    )

    table = pa.table({"id": ["a", "b"], "mse": pa.array([None, None], pa.float32()),
                      "error": ["not an image", "empty bytes"], "label": [1, 0], PATH_COLUMN: ["s/x.parquet"] * 2})
    plan = ScanPlan(id_column="id", label_column="label", kind_column=None, score="mse", scores=("mse",), has_error=True,
                    has_flag=False, top_k=5, sample_fraction=1.0, threshold=0.1, median=math.nan, typical_k=3)
    (scores,) = unpack(scan_scores(table, plan))
    assert (scores.rows, scores.scored, scores.error_rows, scores.top.rows) == (2, 0, 2, [])
    assert sorted(scores.reasons.items()) == [("empty bytes", 1), ("not an image", 1)]
    assert scores.shards == {"s/x.parquet": GroupStats(rows=2, error_rows=2, scored_rows=0, score_sum=0.0, score_max=None)}
    assert scores.sample.column("mse").size == 0
    (flags,) = unpack(scan_flags(table, plan))
    assert (flags.flagged, flags.confusion.tolist(), flags.typical.rows) == (0, [[0, 0], [0, 0]], [])
