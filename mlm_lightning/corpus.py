"""Finding, validating and reading text corpora (txt, jsonl, csv; files, dirs, globs).

Reading is streamed line by line with the standard library so that every problem can be reported with
its file and line number before any tokenization starts.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from mlm_lightning.errors import MLMError, check

TEXT_SUFFIXES = {".txt", ".text", ".md", ".raw"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
CSV_SUFFIXES = {".csv", ".tsv"}
SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | CSV_SUFFIXES
# A single "line" longer than this is split at whitespace so one pathological line cannot exhaust memory.
MAX_CHARS_PER_EXAMPLE = 100_000


def resolve_files(spec: str | Sequence[str] | None, what: str = "train_files") -> list[str]:
    """Expand a path, a list of paths, directories (recursively) and globs into sorted text files."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec or [])
    check(len(specs) > 0, f"no {what} given: pass --data.{what} PATH (a file, a directory or a glob)")
    files: list[str] = []
    for s in map(str, specs):
        if glob.has_magic(s):
            matches = sorted(p for p in glob.glob(s, recursive=True) if os.path.isfile(p))
            matches = [p for p in matches if Path(p).suffix.lower() in SUFFIXES]
            check(bool(matches), f"{what}: the glob {s!r} matches no .txt/.jsonl/.csv file; check the pattern")
            files += matches
        elif os.path.isdir(s):
            found = sorted(
                str(p) for p in Path(s).rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
            )
            check(bool(found), f"{what}: the directory {s!r} has no .txt/.jsonl/.csv file; point at your text files")
            files += found
        else:
            check(os.path.exists(s), f"{what}: {s!r} does not exist; check the path")
            check(os.path.isfile(s), f"{what}: {s!r} is not a regular file")
            files.append(s)
    return list(dict.fromkeys(os.path.abspath(f) for f in files))


def file_kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in CSV_SUFFIXES:
        return "csv"
    return "txt"


def fingerprint(files: Sequence[str], *extra: object) -> str:
    """A cheap, stable key for a corpus: path, size and mtime of each file, plus settings."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(repr(extra).encode())
    return h.hexdigest()[:16]


def _decoded_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) from a UTF-8 file, refusing binary or other encodings with the position."""
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
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


def _records(path: str, text_column: str) -> Iterator[str]:
    kind = file_kind(path)
    if kind == "txt":
        for _, line in _decoded_lines(path):
            yield line
    elif kind == "jsonl":
        for lineno, line in _decoded_lines(path):
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
                    f"{path} line {lineno} has no {text_column!r} field (has {keys});"
                    " pass --data.text_column NAME"
                )
            value = record[text_column]
            if isinstance(value, str):
                yield value
    else:
        lines = (line for _, line in _decoded_lines(path))
        delimiter = "\t" if path.lower().endswith(".tsv") else ","
        reader = csv.DictReader(lines, delimiter=delimiter)
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


def iter_texts(files: Sequence[str], text_column: str = "text") -> Iterator[str]:
    """Yield non-blank examples from every file, failing with file/line context on bad input."""
    for path in files:
        check(os.path.getsize(path) > 0, f"{path} is empty; remove it or add text")
        n = 0
        for text in _records(path, text_column):
            text = text.strip()
            if text:
                n += 1
                yield from _split_long(text)
        check(n > 0, f"{path} has only blank lines (no text in {text_column!r}); remove it or add text")


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
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(paragraphs) + "\n")
        os.replace(tmp, path)
    return path
