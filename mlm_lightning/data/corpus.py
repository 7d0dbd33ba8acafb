"""Finding, validating and reading text corpora (txt, jsonl, csv, parquet; gz/bz2/xz/zst; files, dirs, globs).

Reading is streamed line by line with the standard library so that every problem can be reported with
its file and line number before any tokenization starts.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from mlm_lightning.errors import MLMError, check

TEXT_SUFFIXES = {".txt", ".text", ".md", ".raw"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
CSV_SUFFIXES = {".csv", ".tsv"}
PARQUET_SUFFIXES = {".parquet"}
SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | CSV_SUFFIXES | PARQUET_SUFFIXES
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst"}
# A single "line" longer than this is split at whitespace so one pathological line cannot exhaust memory.
MAX_CHARS_PER_EXAMPLE = 100_000
PARQUET_BATCH_ROWS = 8192


def _suffixes(path: str) -> tuple[str, str]:
    """(format suffix, compression suffix or ""): `a.txt.gz` -> (".txt", ".gz"), `a.csv` -> (".csv", "")."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in COMPRESSIONS:
        return Path(p.stem).suffix.lower(), suffix
    return suffix, ""


def is_corpus_file(path: str) -> bool:
    fmt, compression = _suffixes(path)
    return fmt in SUFFIXES and not (compression and fmt in PARQUET_SUFFIXES)


def resolve_files(spec: str | Sequence[str] | None, what: str = "train_files") -> list[str]:
    """Expand a path, a list of paths, directories (recursively) and globs into sorted text files."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec or [])
    check(len(specs) > 0, f"no {what} given: pass --data.{what} PATH (a file, a directory or a glob)")
    kinds = ".txt/.jsonl/.csv file (plain, .gz, .bz2, .xz or .zst) or .parquet file"
    files: list[str] = []
    for s in map(str, specs):
        if glob.has_magic(s):
            matches = sorted(p for p in glob.glob(s, recursive=True) if os.path.isfile(p))
            matches = [p for p in matches if is_corpus_file(p)]
            check(bool(matches), f"{what}: the glob {s!r} matches no {kinds}; check the pattern")
            files += matches
        elif os.path.isdir(s):
            found = sorted(str(p) for p in Path(s).rglob("*") if p.is_file() and is_corpus_file(str(p)))
            check(bool(found), f"{what}: the directory {s!r} has no {kinds}; point at your text files")
            files += found
        else:
            check(os.path.exists(s), f"{what}: {s!r} does not exist; check the path")
            check(os.path.isfile(s), f"{what}: {s!r} is not a regular file")
            files.append(s)
    return list(dict.fromkeys(os.path.abspath(f) for f in files))


def file_kind(path: str) -> str:
    suffix = _suffixes(path)[0]
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "txt"


def fingerprint(files: Sequence[str], *extra: object) -> str:
    """A cheap, stable key for a corpus: path, size and mtime of each file, plus settings."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(repr(extra).encode())
    return h.hexdigest()[:16]


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

    def __init__(self, files: Sequence[str], text_column: str = "text"):
        self.files, self.text_column = list(files), text_column
        self.total_bytes = sum(os.path.getsize(f) for f in self.files)
        self._done = 0
        self._raw: BinaryIO | None = None
        self._parquet_fraction = 0.0

    def bytes_done(self) -> int:
        current = 0
        if self._raw is not None and not self._raw.closed:
            current = self._raw.tell()
        return self._done + current + int(self._parquet_fraction)

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            size = os.path.getsize(path)
            check(size > 0, f"{path} is empty; remove it or add text")
            n = 0
            with open(path, "rb") as raw:
                self._raw = raw
                for text in self._records(path, raw):
                    text = text.strip()
                    if text:
                        n += 1
                        yield from _split_long(text)
            self._raw, self._parquet_fraction = None, 0.0
            self._done += size
            check(n > 0, f"{path} has only blank lines (no text in {self.text_column!r}); remove it or add text")

    def _records(self, path: str, raw: BinaryIO) -> Iterator[str]:
        kind = file_kind(path)
        if kind == "parquet":
            yield from self._parquet(path, os.path.getsize(path))
        elif kind == "txt":
            for _, line in _decoded_lines(path, _decompressed(path, raw)):
                yield line
        elif kind == "jsonl":
            yield from _jsonl(path, _decoded_lines(path, _decompressed(path, raw)), self.text_column)
        else:
            yield from _csv(path, _decoded_lines(path, _decompressed(path, raw)), self.text_column)

    def _parquet(self, path: str, size: int) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise MLMError(f"{path} is not a readable Parquet file ({_first_line(e)})") from None
        names = pf.schema_arrow.names
        col = self.text_column
        check(col in names, f"{path} has no {col!r} column (columns: {names}); pass --data.text_column NAME")
        kind = pf.schema_arrow.field(col).type
        check(
            pa.types.is_string(kind) or pa.types.is_large_string(kind),
            f"{path} column {col!r} holds {kind}, not text; pass --data.text_column NAME of a string column",
        )
        row, total = 0, max(1, pf.metadata.num_rows)
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[col]):
                for value in batch.column(0).to_pylist():
                    row += 1
                    if value is not None:
                        yield value
                self._parquet_fraction = size * row / total
        except (pa.ArrowException, OSError) as e:
            raise MLMError(f"{path}: cannot read Parquet rows after row {row} ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _decoded_lines(path: str, f: BinaryIO) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) from a UTF-8 stream, refusing binary or other encodings with the position."""
    offset, lineno = 0, 0
    try:
        for lineno, raw in enumerate(f, start=1):  # noqa: B007 - lineno is used in the except clause
            if b"\x00" in raw:
                raise MLMError(
                    f"{path} is not a text file (NUL byte on line {lineno}, byte {offset + raw.index(0)});"
                    " pass UTF-8 text files only"
                )
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MLMError(
                    f"{path} is not UTF-8 (line {lineno}, byte {offset + e.start}: {raw[e.start:e.start + 4]!r});"
                    " convert it, e.g. iconv -f latin1 -t utf-8"
                ) from None
            offset += len(raw)
    except Exception as e:  # gzip/bz2: OSError, EOFError; xz: LZMAError; zstandard.ZstdError (no OSError)
        if isinstance(e, (OSError, EOFError, lzma.LZMAError, zlib.error)) or type(e).__name__ == "ZstdError":
            raise MLMError(
                f"{path} is corrupt or truncated after line {lineno} ({_first_line(e)}); fix or remove it"
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


def iter_texts(files: Sequence[str], text_column: str = "text") -> Iterator[str]:
    """Yield non-blank examples from every file, failing with file/line context on bad input."""
    return iter(CorpusReader(files, text_column))


def default_corpus(cache_dir: str) -> str:
    """The offline default: CPython's bundled language reference (`pydoc_data.topics`), one paragraph a line.

    It ships with every CPython, so the default training needs no download.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - some distro Pythons strip it
        raise MLMError("this Python has no pydoc_data module; pass your own corpus with --data.train_files") from e
    path = os.path.join(cache_dir, "corpus", "python-language-reference-v2.txt")
    if not os.path.exists(path):
        paragraphs = []
        for key in sorted(topics):
            for para in re.split(r"\n\s*\n", topics[key]):
                para = " ".join(para.replace('"', "").split())  # pydoc quotes every keyword: "break"
                if len(para) > 20:
                    paragraphs.append(para)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".corpus-", suffix=".tmp")
        try:
            with open(fd, "w", encoding="utf-8") as f:
                f.write("\n".join(paragraphs) + "\n")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path
