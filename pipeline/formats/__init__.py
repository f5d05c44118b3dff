"""Input formats: one reader per format behind one interface (pipeline.formats.base.ShardReader).

- `parquet`: Parquet with an id column (what every stage writes; img2dataset's Parquet by naming
  its columns);
- `derived`: Parquet with a derived id (`--id-column @row`, `<image>.path`);
- `tar`: WebDataset tar shards (ids `__key__` or `json:<field>`).

A new format is one module whose reader subclasses `ShardReader` and is named with
`register_format`, plus its tests; no stage changes. `pipeline.shards` lists shards
(`ShardList`) and asks `reader_for(shards, columns)` for the rest.
"""

from pipeline.formats import derived, parquet, tar  # noqa: F401 - each module registers its reader
from pipeline.formats.base import FORMATS, ShardReader, reader_for, register_format

__all__ = ["FORMATS", "ShardReader", "reader_for", "register_format"]
