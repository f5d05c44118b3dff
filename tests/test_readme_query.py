"""The README's DuckDB query, run as written on a real latent dataset."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.embed import EmbedConfig, embed
from pipeline.latents import read_latents
from pipeline.synth import write_synthetic_corpus

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_query() -> str:
    """The one ```sql block of the README."""
    blocks = re.findall(r"```sql\n(.*?)\n```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


@pytest.mark.ray
def test_the_readme_duckdb_query_gives_the_worst_rows_with_their_label(ray_local, tiny_model, tmp_path,
                                                                      monkeypatch):
    import duckdb

    data = tmp_path / "shards"
    write_synthetic_corpus(str(data), n=60, image_size=32, anomaly_fraction=0.2, seed=5, rows_per_shard=30)
    latents = tmp_path / "latents"
    embed(EmbedConfig(data_url=str(data), model_url=tiny_model, out_url=str(latents), passthrough=("label",)))
    query = readme_query()
    assert "read_parquet('latents/*.parquet')" in query
    monkeypatch.chdir(tmp_path)  # the query's path is relative, as a user in their work folder types it
    rows = duckdb.sql(query).fetchall()

    table = read_latents(str(latents), columns=["id", "mse", "label"]).to_pylist()
    worst = sorted((r for r in table if r["mse"] is not None), key=lambda r: -r["mse"])[:20]
    assert len(rows) == 20
    assert [(i, label) for i, _, label in rows] == [(r["id"], r["label"]) for r in worst]
    assert [mse for _, mse, _ in rows] == pytest.approx([r["mse"] for r in worst])
