"""URL-list readers: csv, tsv, parquet, jsonl and txt, from any fsspec/pyarrow filesystem.

:func:`read_url_list` returns one Arrow table with the columns ``url`` and ``caption`` (strings),
``source`` (the path the rows came from) and, when asked, every other column of the input
("carried" columns, img2dataset's ``save_additional_columns``).

Guarantees:
- rows are neither dropped nor reordered: a null or empty URL stays, as an empty/null ``url``
  (the downloader records it as ``invalid_url``). Only blank lines of a ``.txt`` list are skipped,
  since they carry no entry;
- a missing URL column raises ``ValueError`` naming the file, the column asked for, the columns
  present, and how to choose another (``ingest.url_col`` / ``--url-col``);
- a missing caption column gives null captions when the default name ``caption`` was asked for,
  and a ``ValueError`` when another name was asked for explicitly;
- carried columns whose names collide with the raw-shard columns (``key``, ``status``, ...) are
  renamed ``src_<name>`` so they can never overwrite ingest's own fields.

Paths may be local paths, ``file://``, ``memory://``, ``s3://``, ``gs://`` ... (anything fsspec
knows, or pyarrow's filesystems when fsspec lacks the driver), a directory (all its list files,
sorted) or a glob. ``.gz``/``.bz2``/``.xz``/``.zst`` text lists are decompressed transparently.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from fsspec.core import OpenFile
from fsspec.utils import infer_compression

from clipline.components.storage import check_bucket, storage_errors

from clipline.components.ingest.schema import RAW_SCHEMA

log = logging.getLogger(__name__)

FORMATS = ("csv", "tsv", "parquet", "jsonl", "txt")
_EXT_TO_FORMAT = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".txt": "txt",
    ".urls": "txt",
}
_COMPRESSION_EXT = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")
RESERVED = frozenset(RAW_SCHEMA.names) | {"source"}
DEFAULT_CAPTION_COL = "caption"


class UrlListError(ValueError):
    """A URL list that cannot be read as asked; the message names the file and the fix."""


# ------------------------------------------------------------------------------ files
def _filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem + path inside it; pyarrow's native filesystems when fsspec lacks a driver."""
    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as fsspec_err:
        try:
            from fsspec.implementations.arrow import ArrowFSWrapper
            from pyarrow import fs as pafs

            afs, inner = pafs.FileSystem.from_uri(path)
            return ArrowFSWrapper(afs), inner
        except Exception:
            raise UrlListError(f"cannot open URL list {path!r}: {fsspec_err}") from fsspec_err


def _format_of(path: str) -> str | None:
    p = PurePosixPath(path.lower())
    suffixes = p.suffixes
    while suffixes and suffixes[-1] in _COMPRESSION_EXT:
        suffixes = suffixes[:-1]
    return _EXT_TO_FORMAT.get(suffixes[-1]) if suffixes else None


def expand_paths(path: str, input_format: str = "auto") -> list[tuple[fsspec.AbstractFileSystem, str]]:
    """The files a URL-list argument stands for: itself, a directory's list files, or a glob."""
    fs, inner = _filesystem(path)
    if any(c in inner for c in "*?["):
        found = sorted(fs.glob(inner))
        if not found:
            raise UrlListError(f"no file matches the URL-list pattern {path!r}")
        return [(fs, f) for f in found if not fs.isdir(f)]
    if not fs.exists(inner):
        check_bucket(fs, "URL list", path)  # a missing bucket says so, not "no such file"
        raise FileNotFoundError(f"URL list {path!r} does not exist")
    if fs.isdir(inner):
        files = []
        for f in sorted(fs.find(inner)):
            name = PurePosixPath(f).name
            if name.startswith((".", "_")):
                continue
            fmt = _format_of(f)
            if fmt is not None and (input_format == "auto" or fmt == input_format):
                files.append((fs, f))
        if not files:
            want = "csv/tsv/parquet/jsonl/txt" if input_format == "auto" else input_format
            raise UrlListError(f"URL-list directory {path!r} holds no {want} files")
        return files
    return [(fs, inner)]


def _open(fs: fsspec.AbstractFileSystem, path: str):
    return OpenFile(fs, path, mode="rb", compression=infer_compression(path)).open()


# ---------------------------------------------------------------------------- readers
def _read_csv(f, delimiter: str, text_cols: Sequence[str]) -> pa.Table:
    return pacsv.read_csv(
        f,
        parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in text_cols}),
    )


def _read_jsonl(f) -> pa.Table:
    data = f.read()
    if data.lstrip()[:1] == b"[":  # a plain JSON array of objects
        return pa.Table.from_pylist(json.loads(data))
    return pajson.read_json(io.BytesIO(data))


def _read_txt(f, label: str) -> pa.Table:
    try:
        text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UrlListError(f"{label}: a txt URL list must be UTF-8 ({e})") from e
    urls = [line.strip() for line in text.splitlines()]
    return pa.table({"url": pa.array([u for u in urls if u], pa.string())})


def _read_one(
    fs, path: str, label: str, fmt: str, url_col: str, caption_col: str | None, carry: bool | Sequence[str]
) -> pa.Table:
    if fmt == "txt":
        with _open(fs, path) as f:
            return _read_txt(f, label)
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            cols = None
            if carry is False or carry is None:  # read only what is used
                cols = [c for c in (url_col, caption_col) if c and c in names]
            elif not isinstance(carry, bool):
                cols = [c for c in dict.fromkeys([url_col, caption_col, *carry]) if c and c in names]
            if url_col not in names:
                return pa.table({n: pa.nulls(0) for n in names})  # schema is enough for the error
            return pf.read(columns=cols)
    try:
        with _open(fs, path) as f:
            if fmt == "jsonl":
                return _read_jsonl(f)
            return _read_csv(f, "," if fmt == "csv" else "\t", [c for c in (url_col, caption_col) if c])
    except (pa.ArrowInvalid, json.JSONDecodeError) as e:
        raise UrlListError(f"{label} could not be parsed as {fmt}: {e}") from e


def _as_string(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_string(col.type):
        return col
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        return pc.cast(col, pa.string())  # invalid UTF-8 raises: better than mojibake
    return col.cast(pa.string())


def read_url_list(
    path: str,
    url_col: str = "url",
    caption_col: str | None = DEFAULT_CAPTION_COL,
    input_format: str = "auto",
    save_additional_columns: bool | Sequence[str] = True,
) -> pa.Table:
    """Read one URL list (a file, a directory of them, or a glob) into url/caption/source/+carried.

    ``input_format`` is ``auto`` (from the extension, compression suffixes ignored) or one of
    csv, tsv, parquet, jsonl, txt. ``save_additional_columns``: True carries every other column,
    False none, a list of names exactly those. See the module docstring for the guarantees.
    """
    if input_format not in ("auto", *FORMATS):
        raise UrlListError(f"input_format must be auto or one of {', '.join(FORMATS)}, not {input_format!r}")
    tables = []
    with storage_errors("URL list", str(path)):  # object storage refusing or unreachable: one line, what to set
        for fs, inner in expand_paths(str(path), input_format):
            label = _display(fs, inner)
            fmt = input_format if input_format != "auto" else _format_of(inner)
            if fmt is None:
                raise UrlListError(
                    f"cannot tell the format of URL list {label} from its name; set ingest.input_format "
                    f"(--input-format) to one of {', '.join(FORMATS)}"
                )
            raw = _read_one(fs, inner, label, fmt, url_col, caption_col, save_additional_columns)
            tables.append(_shape(raw, label, fmt, url_col, caption_col, save_additional_columns))
    return tables[0] if len(tables) == 1 else concat_url_tables(tables)


def _display(fs, inner: str) -> str:
    """How a file is named in ``source`` and in messages: a plain path for local files, a URI
    (protocol://path) for any other filesystem."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        return inner
    return f"{protocol}://{inner.lstrip('/') if protocol != 'memory' else inner}"


def _shape(
    raw: pa.Table, label: str, fmt: str, url_col: str, caption_col: str | None, carry: bool | Sequence[str]
) -> pa.Table:
    names = raw.column_names
    src_url = "url" if fmt == "txt" else url_col
    if src_url not in names:
        hint = [n for n in names if n.lower() == src_url.lower() or "url" in n.lower()]
        raise UrlListError(
            f"URL list {label} has no column {src_url!r} (its columns: {names}). Set the URL column "
            f"with --url-col NAME or ingest.url_col in clipline.toml"
            + (f"; did you mean {hint[0]!r}?" if hint else ".")
        )
    n = raw.num_rows
    url = _as_string(raw.column(src_url))
    if caption_col and caption_col in names:
        caption = _as_string(raw.column(caption_col))
    elif caption_col and caption_col != DEFAULT_CAPTION_COL and fmt != "txt":
        raise UrlListError(
            f"URL list {label} has no caption column {caption_col!r} (its columns: {names}). Set "
            '--caption-col / ingest.caption_col to one of them, or to "" for no captions.'
        )
    else:
        if caption_col and fmt != "txt":
            log.warning("URL list %s has no %r column: captions will be empty", label, caption_col)
        caption = pa.chunked_array([pa.nulls(n, pa.string())])
    source = pa.chunked_array([pa.repeat(pa.scalar(label, pa.string()), n)])
    out = {"url": url, "caption": caption, "source": source}
    if carry:
        used = {src_url, caption_col}
        if isinstance(carry, bool):
            extra = [c for c in names if c not in used]
        else:
            missing = [c for c in carry if c not in names]
            if missing:
                raise UrlListError(
                    f"URL list {label} lacks the column(s) {missing} named in "
                    f"save_additional_columns (its columns: {names})"
                )
            extra = [c for c in carry if c not in used]
        for c in extra:
            name = f"src_{c}" if c in RESERVED else c
            while name in out:
                name = f"src_{name}"
            out[name] = raw.column(c)
    return pa.table(out)


def concat_url_tables(tables: Iterable[pa.Table]) -> pa.Table:
    """Concatenate URL-list tables, promoting types; a carried column whose types disagree
    between files (say int in one, text in another) becomes text."""
    tables = list(tables)
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        types: dict[str, set] = {}
        for t in tables:
            for f in t.schema:
                types.setdefault(f.name, set()).add(f.type)
        clash = {n for n, ts in types.items() if len({t for t in ts if not pa.types.is_null(t)}) > 1}
        fixed = []
        for t in tables:
            for n in clash & set(t.column_names):
                i = t.schema.get_field_index(n)
                t = t.set_column(i, n, _as_string(t.column(n)))
            fixed.append(t)
        return pa.concat_tables(fixed, promote_options="permissive")


def read_url_lists(paths: str | Sequence[str], **kwargs) -> pa.Table:
    """:func:`read_url_list` over several paths, concatenated in order (see concat_url_tables)."""
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        paths = [paths]  # type: ignore[list-item]
    if not paths:
        raise UrlListError("no URL list given")
    tables = [read_url_list(str(p), **kwargs) for p in paths]
    return tables[0] if len(tables) == 1 else concat_url_tables(tables)
