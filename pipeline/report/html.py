"""index.html: the summary rendered by templates/index.html.

Jinja2 with autoescape on: every value from the data (ids, kinds, URLs, error reasons) is
escaped by the template engine where it is printed, so no Python code here builds HTML.
The page has no script and a Content-Security-Policy that forbids any, and links only to
files in the report folder.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import jinja2

from pipeline.report.metrics import QUANTILES

MAX_SHARDS_SHOWN = 100


def number(value: Any, digits: int = 4) -> str:
    """A number for people: floats to `digits` significant digits, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def text(value: Any) -> str:
    """Any value as text; None as nothing."""
    return "" if value is None else str(value)


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.report"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=number, text=text)
    return env


def render_html(summary: dict[str, Any]) -> str:
    """index.html from the summary (as written to summary.json)."""
    scores = summary["scores"]
    shards = sorted(summary["shards"], key=lambda r: (-(r["flag_rate"] or 0), r["shard"]))
    return _environment().get_template("index.html").render(
        s=summary,
        embed=summary["latents"]["metadata"] or {},
        metrics=summary.get("metrics"),
        by_kind=summary.get("by_kind"),
        galleries=summary.get("galleries"),
        interpolation=summary.get("interpolation"),
        near_duplicates=summary.get("near_duplicates"),
        score_names=[n for n, v in scores.items() if isinstance(v, dict) and v.get("count")],
        quantile_keys=[f"{q:g}" for q in QUANTILES],
        shards=shards[:MAX_SHARDS_SHOWN],
        shards_total=len(shards),
    )
