"""WebDataset tar shards (img2dataset's layout): member names, the header check, samples as rows.

A tar shard holds samples: members that share a key and sit next to each other, named
`<key>.<suffix>` (img2dataset writes `000010012.jpg`, `000010012.json`, `000010012.txt`). The
key is the member's path up to the first dot of its file name, the suffix the rest: the rule
of the `webdataset` package and of Ray's `read_webdataset`, so a key never holds a dot.

A sample becomes a row with the same columns as a Parquet image shard, so decoding, training
and embedding treat both alike:
- the id (`FieldSpec`): `__key__` (the default for tar input), or `json:<field>`, a field of the
  sample's JSON member;
- the image: with the image column "image" the first of `IMAGE_MEMBERS` the sample has (or the
  one member named by --image-column), as its encoded bytes. A sample without one keeps its row,
  with a null image and the reason `NO_IMAGE` in `REASON_COLUMN`;
- passthrough fields, each a column named as asked: a member's text (`txt`, `json`, `cls`) or
  `json:<field>`. Text members are UTF-8 (undecodable bytes replaced); a JSON value that is not a
  string arrives as its JSON text (`256`, `true`), so a column has one type in every block.

`index_shard` reads one shard's member headers (and, for a `json:<field>` id, its JSON members),
never its images: rows, ids, and every problem named before any work (not a tar, cut short,
a key split over non-adjacent members, a member twice).
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from pipeline.errors import InputError

# img2dataset's image member names (its --output_format webdataset with jpg/png/webp encoding),
# in the order the default image column takes them.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
DEFAULT_IMAGE = "image"  # the image column name that means "the first of IMAGE_MEMBERS"
KEY_ID = "__key__"  # the sample key, as WebDataset names it
JSON_PREFIX = "json:"  # json:<field>: a field of the sample's .json member
REASON_COLUMN = "__reason__"  # why a row has no image, set by the reader ("no image member")
NO_IMAGE = "no image member"
ROWS_PER_BLOCK = 256  # samples per Arrow block a reader yields
_END_OF_ARCHIVE = 1024  # two zero blocks close a tar archive
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_name(name: str) -> tuple[str | None, str | None]:
    """'dir/000010012.seg.png' -> ('dir/000010012', 'seg.png'); (None, None) without a suffix."""
    match = _NAME.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def image_members(image_column: str) -> tuple[str, ...]:
    """The members an image column stands for: all of IMAGE_MEMBERS for "image", else that member."""
    return IMAGE_MEMBERS if image_column == DEFAULT_IMAGE else (image_column,)


def check_field(spec: str, role: str, image_column: str = DEFAULT_IMAGE) -> None:
    """InputError unless `spec` names something a tar sample can give for `role` ("id", "passthrough")."""
    if spec.startswith(JSON_PREFIX):
        if not spec[len(JSON_PREFIX):]:
            raise InputError(f"{role} {spec!r}: name a JSON field, as json:<field>")
        return
    if role == "id" and spec != KEY_ID:
        raise InputError(f"tar shards have no id column {spec!r}: use --id-column {KEY_ID} (the sample key, "
                         f"the default) or --id-column json:<field> (a field of each sample's .json)")
    if role != "id" and (spec in image_members(image_column) or spec in IMAGE_MEMBERS):
        raise InputError(f"passthrough {spec!r} is an image member; the image is read as the image column")


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def _json_text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


class Sample:
    """One sample: its key and members {suffix: bytes}; gives the fields rows are made of."""

    def __init__(self, key: str, members: dict[str, bytes]):
        self.key = key
        self.members = members
        self._json = None

    def json_field(self, name: str) -> str | None:
        if self._json is None:
            data = self.members.get("json")
            try:
                parsed = json.loads(data) if data is not None else {}
            except (UnicodeDecodeError, json.JSONDecodeError):
                parsed = {}
            self._json = parsed if isinstance(parsed, dict) else {}
        return _json_text(self._json.get(name))

    def field(self, spec: str) -> str | None:
        """The value of an id or passthrough spec: __key__, json:<field>, or a member's text."""
        if spec == KEY_ID:
            return self.key
        if spec.startswith(JSON_PREFIX):
            return self.json_field(spec[len(JSON_PREFIX):])
        return _text(self.members.get(spec))

    def image(self, image_column: str) -> bytes | None:
        for member in image_members(image_column):
            if member in self.members:
                return self.members[member]
        return None


def _named_members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """(member, key, suffix) of the regular files whose name has a suffix; others are no sample's."""
    for info in tar:
        key, suffix = split_name(info.name) if info.isreg() else (None, None)
        if key is not None:
            yield info, key, suffix


def iter_samples(fileobj, where: str) -> Iterator[Sample]:
    """The samples of a tar stream, in order, read sequentially (no seeks: fine for object storage)."""
    key, members = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as stream:
        for info, member_key, suffix in _named_members(stream):
            data = stream.extractfile(info).read()
            if member_key != key:
                if key is not None:
                    yield Sample(key, members)
                key, members = member_key, {}
            if suffix in members:
                raise ValueError(f"{where}: member {info.name!r} occurs twice")
            members[suffix] = data
    if key is not None:
        yield Sample(key, members)


def rows_table(samples: Sequence[Sample], id_spec: str, image_column: str, extra: Sequence[str]) -> pa.Table:
    """Samples -> an Arrow table: the id, the image (binary, null without one), REASON_COLUMN, extras.

    Every block has the same schema: strings for ids, reasons and fields, binary for images.
    """
    images = [sample.image(image_column) for sample in samples]
    columns = {id_spec: pa.array([sample.field(id_spec) for sample in samples], pa.string()),
               image_column: pa.array(images, pa.binary()),
               REASON_COLUMN: pa.array([NO_IMAGE if image is None else None for image in images], pa.string())}
    for name in extra:
        if name not in columns:
            columns[name] = pa.array([sample.field(name) for sample in samples], pa.string())
    return pa.table(columns)


def chunked(samples: Iterable[Sample], size: int = ROWS_PER_BLOCK) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- the header check ---------------------------------------------------------------------


@dataclass(frozen=True)
class ShardIndex:
    """One tar shard as its headers describe it: byte size and, per sample, key and id."""

    size: int
    keys: tuple[str, ...]
    ids: tuple[str | None, ...]  # the id spec's value per sample (the keys for __key__)

    @property
    def rows(self) -> int:
        return len(self.keys)


def _unreadable(url: str, why: str) -> InputError:
    return InputError(f"shard {url} is not a readable tar file ({why}); remove or replace it and run again")


def index_shard(fileobj, url: str, id_spec: str = KEY_ID) -> ShardIndex:
    """Read the member headers of one tar shard (random access: seeks past the images).

    For a `json:<field>` id the JSON members are read too. InputError naming the shard when it
    is not a tar, is cut short (no end-of-archive blocks), splits a sample over non-adjacent
    members, or holds a member twice.
    """
    keys: list[str] = []
    ids: list[str | None] = []
    seen: set[str] = set()
    suffixes: set[str] = set()
    try:
        size = fileobj.seek(0, 2)
        fileobj.seek(0)
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            json_member = None
            for info, key, suffix in _named_members(tar):
                if not keys or key != keys[-1]:
                    if key in seen:
                        raise InputError(f"shard {url}: the members of sample {key!r} are not next to each other "
                                         "(WebDataset keeps a sample's members together; rewrite the tar sorted "
                                         "by name)")
                    if id_spec != KEY_ID and keys:
                        ids.append(_json_id(tar, json_member, id_spec, url, keys[-1]))
                    seen.add(key)
                    keys.append(key)
                    suffixes, json_member = set(), None
                if suffix in suffixes:
                    raise InputError(f"shard {url}: member {info.name!r} occurs twice")
                suffixes.add(suffix)
                if suffix == "json":
                    json_member = info
            if id_spec != KEY_ID and keys:
                ids.append(_json_id(tar, json_member, id_spec, url, keys[-1]))
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError) as error:
        raise _unreadable(url, str(error) or type(error).__name__) from error
    if size - end < _END_OF_ARCHIVE:
        raise _unreadable(url, f"it ends at byte {size} without the end-of-archive blocks: cut short?")
    return ShardIndex(size=size, keys=tuple(keys), ids=tuple(keys) if id_spec == KEY_ID else tuple(ids))


def _json_id(tar: tarfile.TarFile, member, id_spec: str, url: str, key: str) -> str:
    name = id_spec[len(JSON_PREFIX):]
    if member is None:
        raise InputError(f"shard {url}: sample {key!r} has no .json member to take --id-column {id_spec} from")
    value = Sample(key, {"json": tar.extractfile(member).read()}).json_field(name)
    if value is None:
        raise InputError(f"shard {url}: sample {key!r} has no JSON field {name!r} (or it is null) for "
                         f"--id-column {id_spec}; use --id-column {KEY_ID}")
    return value


def find_samples(fileobj, keys: set[str], image_column: str, id_spec: str = KEY_ID) -> dict[str, bytes | None]:
    """{id: image bytes} for the samples of one tar stream whose id is in `keys` (a streaming scan)."""
    found = {}
    for sample in iter_samples(fileobj, "tar"):
        sample_id = sample.field(id_spec)
        if sample_id in keys:
            found[sample_id] = sample.image(image_column)
    return found
