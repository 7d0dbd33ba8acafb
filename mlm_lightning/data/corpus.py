"""Finding, validating and reading text corpora (txt, jsonl, csv, parquet, Hugging Face `save_to_disk` dirs;
gz/bz2/xz/zst; files, dirs, globs), on a local disk or in a store fsspec reaches (s3://, gs://, http(s)://).

Reading is streamed line by line with the standard library so that every problem can be reported with
its file and line number before any tokenization starts.

The one file-system seam is here (`resolve_files`, `file_size`, `fingerprint`, `open_binary`): local paths go
through `os` (the same cache keys as ever), URLs through `remote.py` (fsspec), read as streams (a few MB buffered,
never downloaded first), with the store's errors turned into one line naming the URL.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from mlm_lightning.data import remote
from mlm_lightning.data.remote import is_url, redacted  # noqa: F401 (corpus.redacted: the callers' name)
from mlm_lightning.errors import MLMError, check, first_line

TEXT_SUFFIXES = {".txt", ".text", ".md", ".raw"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
CSV_SUFFIXES = {".csv", ".tsv"}
PARQUET_SUFFIXES = {".parquet"}
ARROW_SUFFIXES = {".arrow"}  # Arrow IPC streams, as `datasets`' save_to_disk writes them
SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | CSV_SUFFIXES | PARQUET_SUFFIXES | ARROW_SUFFIXES
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst"}
# A single "line" longer than this is split at whitespace so one pathological line cannot exhaust memory.
MAX_CHARS_PER_EXAMPLE = 100_000
PARQUET_BATCH_ROWS = 8192


def _suffixes(path: str) -> tuple[str, str]:
    """(format suffix, compression suffix or ""): `a.txt.gz` -> (".txt", ".gz"), `a.csv` -> (".csv", "").

    A URL's query (a presigned https URL's `?X-Amz-...`) is not part of its name."""
    p = Path(remote.without_query(path))
    suffix = p.suffix.lower()
    if suffix in COMPRESSIONS:
        return Path(p.stem).suffix.lower(), suffix
    return suffix, ""


def is_corpus_file(path: str) -> bool:
    fmt, compression = _suffixes(path)
    return fmt in SUFFIXES and not (compression and fmt in PARQUET_SUFFIXES | ARROW_SUFFIXES)


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _remote_files(spec: str, storage_options: dict | None, what: str, kinds: str) -> list[str]:
    """The corpus files a URL names: a file, a directory (prefix) the store lists, or a glob."""
    fs, path = remote.filesystem(spec, storage_options)
    fs.invalidate_cache()  # a fresh look at the store: an object changed since the last listing gets a new key

    def url_of(p: str) -> str:
        return p if is_url(p) else fs.unstrip_protocol(p)

    if glob.has_magic(path):
        found = remote.retrying(spec, lambda: fs.glob(path, detail=True))
        remote.remember(found, url_of, storage_options)
        matches = sorted(url_of(p) for p, i in found.items() if i.get("type") != "directory" and is_corpus_file(p))
        check(bool(matches), f"{what}: the glob {spec!r} matches no {kinds}; check the pattern")
        return matches
    info = remote.retrying(spec, lambda: fs.info(path))
    # an http "directory" is an HTML page of links: asking any other URL for its links would download it
    is_dir = info.get("type") == "directory" or (remote.is_http(spec) and (
        spec.endswith("/") or info.get("mimetype") == "text/html"))
    if not is_dir:
        remote.remember({path: info}, url_of, storage_options)
        return [url_of(path)]
    found = remote.retrying(spec, lambda: fs.find(path, detail=True))
    remote.remember(found, url_of, storage_options)
    listed = sorted(url_of(p) for p, i in found.items() if i.get("type") != "directory")
    files = _with_datasets(spec, listed, storage_options)
    check(bool(files), f"{what}: {spec!r} lists no {kinds}; point at your text files")
    return files


def _with_datasets(root: str, listed: list[str], storage_options: dict | None) -> list[str]:
    """The corpus files among `listed` (all files under directory `root`, sorted); a `datasets` save_to_disk
    directory in there (one with a state.json) gives its Arrow files, in its own order, and none of its json."""
    whole = _hf_dataset_files(root, storage_options)  # (a DatasetDict is refused here, with its splits named)
    if whole is not None:
        return whole
    dirs = {f.rsplit("/", 1)[0] for f in listed if f.endswith("/state.json")}
    dirs = {d for d in dirs if not any(d.startswith(o + "/") for o in dirs)}  # the outermost ones
    out, done = [], set()
    for f in listed:
        owner = next((d for d in dirs if f.startswith(d + "/")), None)
        if owner is None:
            out += [f] if is_corpus_file(f) else []
        elif owner not in done:
            done.add(owner)
            out += _hf_dataset_files(owner, storage_options) or []
    return out


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_url(base) else os.path.join(base, name)


def _hf_dataset_files(directory: str, storage_options: dict | None = None) -> list[str] | None:
    """The Arrow files of a `datasets` save_to_disk directory, in its order (None: not such a directory).

    `state.json` lists them (`_data_files`); `dataset_dict.json` marks a DatasetDict, whose splits are the
    datasets. Read directly with pyarrow: no `datasets` install, no conversion."""
    state_path, dict_path = _join(directory, "state.json"), _join(directory, "dataset_dict.json")
    def exists(p: str) -> bool:
        if not is_url(p):
            return os.path.isfile(p)
        fs, inner = remote.filesystem(p, storage_options)
        return remote.retrying(p, lambda: fs.exists(inner))

    def read(p: str) -> bytes:
        if not is_url(p):
            return Path(p).read_bytes()
        fs, inner = remote.filesystem(p, storage_options)
        return remote.retrying(p, lambda: fs.cat_file(inner))

    if exists(dict_path):
        splits = json.loads(read(dict_path)).get("splits", [])
        raise MLMError(f"{directory} is a datasets DatasetDict with splits {splits}; point at one split:"
                       f" {_join(directory, splits[0] if splits else 'train')}")
    if not exists(state_path):
        return None
    try:
        state = json.loads(read(state_path))
        names = [d["filename"] for d in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise MLMError(f"{state_path} is not a datasets state.json ({first_line(e)}); save it again") from None
    check(not state.get("_indices_data_files"), f"{directory} has an indices mapping; save it again after"
          " .flatten_indices() (datasets does that in save_to_disk since 2.x)")
    check(bool(names), f"{directory}: its state.json lists no data files")
    for name in names:
        check("/" not in name and "\\" not in name and name not in (".", ".."),
              f"{state_path} names an unexpected data file {name!r}")
    return [_join(directory, name) for name in names]


def resolve_files(spec: str | Sequence[str] | None, what: str = "train_files",
                  storage_options: dict | None = None) -> list[str]:
    """Expand paths or URLs, directories (recursively) and globs into sorted corpus files.

    A `datasets` save_to_disk directory gives its Arrow files in its own order."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec or [])
    check(len(specs) > 0, f"no {what} given: pass --data.{what} PATH (a file, a directory or a glob)")
    kinds = ".txt/.jsonl/.csv file (plain, .gz, .bz2, .xz or .zst), .parquet file or datasets save_to_disk dir"
    files: list[str] = []
    for s in map(str, specs):
        if is_url(s):
            files += _remote_files(s, storage_options, what, kinds)
            continue
        s = _local(s)
        if glob.has_magic(s):
            matches = sorted(p for p in glob.glob(s, recursive=True) if os.path.isfile(p))
            matches = [p for p in matches if is_corpus_file(p)]
            check(bool(matches), f"{what}: the glob {s!r} matches no {kinds}; check the pattern")
            files += matches
        elif os.path.isdir(s):
            listed = sorted(str(p) for p in Path(s).rglob("*") if p.is_file())
            found = _with_datasets(s, listed, None)
            check(bool(found), f"{what}: the directory {s!r} has no {kinds}; point at your text files")
            files += found
        else:
            check(os.path.exists(s), f"{what}: {s!r} does not exist; check the path")
            check(os.path.isfile(s), f"{what}: {s!r} is not a regular file")
            files.append(s)
    return list(dict.fromkeys(f if is_url(f) else os.path.abspath(f) for f in files))


def file_kind(path: str) -> str:
    suffix = _suffixes(path)[0]
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in ARROW_SUFFIXES:
        return "arrow"
    return "txt"


def file_size(path: str, storage_options: dict | None = None) -> int:
    """Stored bytes (compressed for .gz etc.): the progress bar's unit."""
    if not is_url(path):
        return os.path.getsize(path)
    return int(remote.object_info(path, storage_options).get("size") or 0)


def fingerprint(files: Sequence[str], *extra: object, storage_options: dict | None = None) -> str:
    """A cheap, stable key for a corpus: path, size and mtime of each file (for a URL: the store's ETag or
    version, size and modification time; nothing is read), plus settings."""
    h = hashlib.sha256()
    for f in files:
        if is_url(f):
            info = remote.object_info(f, storage_options)
            identity = [str(info[k]) for k in remote.IDENTITY_KEYS if info.get(k) is not None]
            # (without the query: a presigned URL signed again names the same object)
            h.update(f"{remote.without_query(f)}|{info.get('size')}|{'|'.join(identity)}\n".encode())
        else:  # (unchanged for local files: caches made before URLs were read stay valid)
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(repr(extra).encode())
    return h.hexdigest()[:16]


def open_binary(path: str, storage_options: dict | None = None) -> BinaryIO:
    """A buffered binary stream of a local file or URL (only URLs pass through fsspec)."""
    if not is_url(path):
        return open(path, "rb")
    return remote.open_stream(path, storage_options)


def _decompressed(path: str, raw: BinaryIO) -> BinaryIO:
    compression = _suffixes(path)[1]
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if compression == ".bz2":
        return bz2.BZ2File(raw)
    if compression == ".xz":
        return lzma.LZMAFile(raw)
    if compression == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


class CorpusReader:
    """Iterate the non-blank examples of several files, knowing how many bytes of them were read so far.

    `bytes_done()` counts bytes of the files as stored (compressed bytes for .gz etc.): the progress bar's
    unit, known without decompressing anything ahead.
    """

    def __init__(self, files: Sequence[str], text_column: str = "text", storage_options: dict | None = None):
        self.files, self.text_column, self.storage_options = list(files), text_column, storage_options
        self.sizes = [file_size(f, storage_options) for f in self.files]
        self.total_bytes = sum(self.sizes)
        self._done = 0
        self._raw: BinaryIO | None = None
        self._parquet_fraction = 0.0

    def bytes_done(self) -> int:
        current = 0
        if self._raw is not None and not self._raw.closed:
            current = self._raw.tell()
        return self._done + current + int(self._parquet_fraction)

    def __iter__(self) -> Iterator[str]:
        for path, size in zip(self.files, self.sizes, strict=True):
            check(size > 0, f"{path} is empty; remove it or add text")
            n = 0
            with contextlib.ExitStack() as stack:  # (a Parquet file is opened by its reader: it reads the end first)
                parquet = file_kind(path) == "parquet"
                raw = None if parquet else stack.enter_context(open_binary(path, self.storage_options))
                self._raw = raw
                for text in self._records(path, raw, size):
                    text = text.strip()
                    if text:
                        n += 1
                        yield from _split_long(text)
            self._raw, self._parquet_fraction = None, 0.0
            self._done += size
            check(n > 0, f"{path} has only blank lines (no text in {self.text_column!r}); remove it or add text")

    def _records(self, path: str, raw: BinaryIO | None, size: int) -> Iterator[str]:
        kind = file_kind(path)
        if kind == "parquet":
            yield from self._parquet(path, size)
        elif kind == "arrow":
            yield from self._arrow(path, raw)
        elif kind == "txt":
            for _, line in _decoded_lines(path, _decompressed(path, raw)):
                yield line
        elif kind == "jsonl":
            yield from _jsonl(path, _decoded_lines(path, _decompressed(path, raw)), self.text_column)
        else:
            yield from _csv(path, _decoded_lines(path, _decompressed(path, raw)), self.text_column)

    def _text_column(self, path: str, schema) -> None:
        import pyarrow as pa

        names, col = schema.names, self.text_column
        check(col in names, f"{path} has no {col!r} column (columns: {names}); pass --data.text_column NAME")
        kind = schema.field(col).type
        check(
            pa.types.is_string(kind) or pa.types.is_large_string(kind),
            f"{path} column {col!r} holds {kind}, not text; pass --data.text_column NAME of a string column",
        )

    def _arrow(self, path: str, raw: BinaryIO) -> Iterator[str]:
        """An Arrow IPC stream (a `datasets` save_to_disk shard), read batch by batch from the stream."""
        import pyarrow as pa

        try:
            reader = pa.ipc.open_stream(raw)
        except (pa.ArrowException, OSError) as e:
            raise MLMError(f"{path} is not an Arrow stream file (as datasets writes) ({first_line(e)})") from None
        self._text_column(path, reader.schema)
        row = 0
        try:
            for batch in reader:
                for value in batch.column(self.text_column).to_pylist():
                    row += 1
                    if value is not None:
                        yield value
        except (pa.ArrowException, OSError) as e:
            raise MLMError(f"{path}: cannot read Arrow rows after row {row} ({first_line(e)})") from None

    def _parquet(self, path: str, size: int) -> Iterator[str]:
        with contextlib.ExitStack() as stack:
            if is_url(path):  # random access (footer first): fsspec's seekable file, REMOTE_BLOCK per request
                fs, inner = remote.filesystem(path, self.storage_options)
                block = remote.REMOTE_BLOCK
                source = stack.enter_context(remote.retrying(path, lambda: fs.open(inner, "rb", block_size=block)))
            else:
                source = path
            yield from self._parquet_rows(path, size, source)

    def _parquet_rows(self, path: str, size: int, source) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(source)
        except (pa.ArrowException, OSError) as e:
            raise MLMError(f"{path} is not a readable Parquet file ({first_line(e)})") from None
        col = self.text_column
        self._text_column(path, pf.schema_arrow)
        row, total = 0, max(1, pf.metadata.num_rows)
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[col]):
                for value in batch.column(0).to_pylist():
                    row += 1
                    if value is not None:
                        yield value
                self._parquet_fraction = size * row / total
        except (pa.ArrowException, OSError) as e:
            raise MLMError(f"{path}: cannot read Parquet rows after row {row} ({first_line(e)})") from None


# the first bytes of binary formats that get renamed .txt
_MAGIC = {b"%PDF": "a PDF", b"PK\x03\x04": "a zip archive (docx, xlsx, odt, epub ...)", b"\x89PNG": "a PNG image",
          b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"\x7fELF": "a program",
          b"\xd0\xcf\x11\xe0": "an old Office document (doc, xls)", b"\x1f\x8b": "gzip data (name it .gz)"}
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\r\x0c\x1b")


def _binary_kind(first: bytes, line: bytes) -> str | None:
    """What a file that is not UTF-8 is, if it is binary rather than text in another encoding: a known format by
    its first bytes, or a line with control bytes (latin-1 or cp1252 text has none)."""
    kind = next((k for magic, k in _MAGIC.items() if first.startswith(magic)), None)
    if kind is None and sum(line.count(b) for b in _CONTROL) > max(1, len(line) // 100):
        kind = "binary data"
    elif kind is not None:
        kind = f"{kind}, a binary file"
    return kind


def _decoded_lines(path: str, f: BinaryIO) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) from a UTF-8 stream, refusing binary or other encodings with the position."""
    offset, lineno, first = 0, 0, b""
    try:
        for lineno, raw in enumerate(f, start=1):  # noqa: B007 - lineno is used in the except clause
            first = raw if lineno == 1 else first
            if b"\x00" in raw:
                kind = _binary_kind(first, b"")
                raise MLMError(
                    f"{path} is not a text file ({kind + ': ' if kind else ''}NUL byte on line {lineno}, byte"
                    f" {offset + raw.index(0)}); pass UTF-8 text files only"
                )
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                kind = _binary_kind(first, raw)
                check(kind is None, f"{path} is {kind}, not text (line {lineno}, byte {offset + e.start}); extract"
                                    " its text first (e.g. pdftotext for a PDF) and pass that")
                raise MLMError(
                    f"{path} is not UTF-8 (line {lineno}, byte {offset + e.start}: {raw[e.start:e.start + 4]!r});"
                    " convert it, e.g. iconv -f latin1 -t utf-8"
                ) from None
            offset += len(raw)
    except Exception as e:  # gzip/bz2: OSError, EOFError; xz: LZMAError; zstandard.ZstdError (no OSError)
        if isinstance(e, (OSError, EOFError, lzma.LZMAError, zlib.error)) or type(e).__name__ == "ZstdError":
            raise MLMError(
                f"{path} is corrupt or truncated after line {lineno} ({first_line(e)}); fix or remove it"
            ) from None
        raise


def _jsonl(path: str, lines: Iterator[tuple[int, str]], text_column: str) -> Iterator[str]:
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MLMError(
                f"{path} line {lineno} is not valid JSON ({e.msg}); write one JSON object per line"
            ) from None
        if not isinstance(record, dict) or text_column not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise MLMError(
                f"{path} line {lineno} has no {text_column!r} field (has {keys}); pass --data.text_column NAME"
            )
        value = record[text_column]
        if not isinstance(value, str):
            found = "null" if value is None else type(value).__name__
            raise MLMError(
                f"{path} line {lineno}: the {text_column!r} field is {found}, not a string;"
                " fix that line or pass --data.text_column NAME of a text field"
            )
        yield value


def _csv(path: str, lines: Iterator[tuple[int, str]], text_column: str) -> Iterator[str]:
    delimiter = "\t" if _suffixes(path)[0] == ".tsv" else ","
    reader = csv.DictReader((line for _, line in lines), delimiter=delimiter)
    try:
        header = reader.fieldnames or []
        check(bool(header), f"{path} is empty; remove it or add text")
        check(
            text_column in header,
            f"{path} has no {text_column!r} column (columns: {header}); pass --data.text_column NAME",
        )
        for row in reader:
            value = row.get(text_column)
            if value:
                yield value
    except csv.Error as e:
        raise MLMError(f"{path} line {reader.line_num} is not valid CSV ({e}); fix that line") from None


def _split_long(text: str) -> Iterator[str]:
    if len(text) <= MAX_CHARS_PER_EXAMPLE:
        yield text
        return
    start = 0
    while start < len(text):
        end = min(start + MAX_CHARS_PER_EXAMPLE, len(text))
        if end < len(text):
            space = text.rfind(" ", start, end)
            end = space if space > start else end
        yield text[start:end]
        start = end


def iter_texts(files: Sequence[str], text_column: str = "text", storage_options: dict | None = None) -> Iterator[str]:
    """Yield non-blank examples from every file, failing with file/line context on bad input."""
    return iter(CorpusReader(files, text_column, storage_options))
