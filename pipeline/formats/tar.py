"""WebDataset tar shards (img2dataset's layout; members and samples in pipeline.tars).

Tar input has no columns: its id is the sample key `__key__` (what the default "id" means here)
or `json:<field>`, and every check reads the member headers (`index`, once per id, many shards at
a time) instead of Parquet footers: an unreadable shard is named before any work. Rows are read by
pipeline.formats.sources.TarShards, fetched by a streaming scan that stops once every id is
found, and a sample without an image keeps its row with the reason `tars.NO_IMAGE`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pyarrow as pa

from pipeline import storage, tars
from pipeline.errors import InputError
from pipeline.formats.base import REASON_COLUMN, ShardReader, register_format
from pipeline.formats.columns import ColumnError


@register_format
class TarReader(ShardReader):
    name = kind = "tar"
    suffix = storage.TAR_SUFFIX
    description = "WebDataset shards (*.tar)"
    default_id = tars.KEY_ID

    def index(self, id_spec: str = tars.KEY_ID) -> list[tars.ShardIndex]:
        """Every shard's headers (rows, keys, ids by `id_spec`), read once per id."""
        def read(shard_url: str) -> tars.ShardIndex:
            fs, path = storage.filesystem(shard_url)
            try:
                with fs.open(path, "rb") as f:
                    return tars.index_shard(f, shard_url, id_spec)
            except FileNotFoundError as error:
                raise InputError(f"shard {shard_url} is not a readable tar file ({error})") from error

        indexes = self.cached(("index", id_spec), lambda: self.per_shard(read))
        self.cached("sizes", lambda: [(index.size, index.rows) for index in indexes])  # the same for every id
        return indexes

    def sizes(self) -> list[tuple[int, int]]:
        return self.cached("sizes", lambda: [(index.size, index.rows) for index in self.index()])

    def check(self, passthrough: Sequence[str] = ()) -> pa.Schema:
        """The id and passthrough fields checked as specs (pipeline.tars), the headers read; the schema is
        the rows' own: strings, and the image as binary."""
        columns = self.columns
        tars.check_field(columns.id, "id", columns.image)
        if columns.image != tars.DEFAULT_IMAGE and columns.image.startswith(tars.JSON_PREFIX):
            raise ColumnError(f"--image-column {columns.image!r}: name an image member "
                              f"({', '.join(tars.IMAGE_MEMBERS)}) or keep {tars.DEFAULT_IMAGE!r} (the first of them "
                              "a sample has)")
        for name in passthrough:
            tars.check_field(name, "passthrough", columns.image)
        self.index(columns.id)  # reads the headers: an unreadable shard is named now
        fields = [(columns.id, pa.string()), (columns.image, pa.binary())]
        fields += [(name, pa.string()) for name in dict.fromkeys(passthrough)
                   if name not in (columns.id, columns.image)]
        return pa.schema(fields)

    def all_ids(self) -> pa.ChunkedArray:
        return pa.chunked_array([pa.array(index.ids, pa.string()) for index in self.index(self.columns.id)],
                                pa.string())

    def first_images(self, limit: int) -> list[bytes | None]:
        found: list[bytes | None] = []
        for shard_url in self.shards.files:
            fs, path = storage.filesystem(shard_url)
            with fs.open(path, "rb") as f:
                for sample in tars.iter_samples(f, shard_url):
                    found.append(sample.image(self.columns.image))
                    if len(found) >= limit:
                        return found
        return found

    def dataset(self, extra: Sequence[str] = (), override_num_blocks: int | None = None, num_cpus: float = 1.0):
        import ray.data

        from pipeline.formats.sources import TarShards

        source = TarShards(self.shards.paths, filesystem=self.shards.arrow_fs, columns=self.columns, extra=extra)
        ds = ray.data.read_datasource(source, override_num_blocks=override_num_blocks or len(self.shards.files),
                                      num_cpus=num_cpus)
        return ds.select_columns(list(dict.fromkeys([self.columns.id, self.columns.image, *extra, REASON_COLUMN])))

    def fetch(self, ids: Sequence[str]) -> dict[str, bytes | None]:
        """A streaming scan of the shards the headers say hold the ids; stops once every id is found."""
        wanted, found = set(ids), {}
        for shard_url, index in zip(self.shards.files, self.index(self.columns.id)):
            if not wanted.intersection(index.ids):
                continue
            fs, path = storage.filesystem(shard_url)
            with fs.open(path, "rb") as f:
                found.update(tars.find_samples(f, wanted - set(found), self.columns.image, self.columns.id))
            if len(found) == len(wanted):
                break
        return found

    def ingest_batches(self, shard_url: str, shard_name: str, copied: Sequence[str],
                       batch_rows: int) -> Iterator[pa.Table]:
        """Samples streamed in order; a row's place and source are `<shard url>#<key>`."""
        id_spec, image = self.columns.id, self.columns.image
        fs, path = storage.filesystem(shard_url)
        with fs.open(path, "rb") as f:
            for chunk in tars.chunked(tars.iter_samples(f, shard_url), batch_rows):
                rows = tars.rows_table(chunk, id_spec, image, copied)
                where = pa.array([f"{shard_url}#{sample.key}" for sample in chunk], pa.string())
                yield pa.table({"id": rows[id_spec], "image": rows[image], REASON_COLUMN: rows[REASON_COLUMN],
                                "__where__": where, "__source__": where, **{name: rows[name] for name in copied}})
