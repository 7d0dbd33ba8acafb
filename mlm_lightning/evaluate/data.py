"""The labelled data of `evaluate`: csv, jsonl or parquet files (local or at a URL, through the corpus reader's file
seam), a text column, an optional second text column and a label column; train/validation/test files or one
file split by a seed.

The corpus reader yields one text column and skips blank rows (a corpus has no rows to keep aligned); a labelled
row is several columns that must stay together, so the rows are parsed here from the bytes `open_binary` gives.
Labelled sets are small: each file is read whole into memory.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field

from mlm_lightning.data.corpus import file_kind, is_url, open_binary, resolve_files
from mlm_lightning.errors import MLMError, check

FORMATS = ("csv", "jsonl", "parquet")


@dataclass
class Rows:
    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    labels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> Rows:
        return Rows([self.texts[i] for i in indices], None if self.pairs is None else [self.pairs[i] for i in indices],
                    [self.labels[i] for i in indices])


@dataclass
class Task:
    """The splits (validation may be empty) and the class names, in sorted order (class i is `labels[i]`)."""

    train: Rows
    validation: Rows
    test: Rows
    labels: list[str]
    sources: dict[str, str]

    def ids(self, rows: Rows) -> list[int]:
        index = {name: i for i, name in enumerate(self.labels)}
        return [index[label] for label in rows.labels]


def _label(value) -> str | None:
    """A label as text (1 and "1" are the same class); None: missing."""
    if value is None or (isinstance(value, float) and value != value):  # (NaN: pandas' missing value in parquet)
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def read_rows(spec: str, option: str, text_column: str, pair_column: str | None, label_column: str,
              storage_options: dict | None = None) -> Rows:
    """Every row of the file `spec` names, each with its text (and pair) and label; one line for any problem."""
    files = resolve_files(spec, option, storage_options)
    check(len(files) == 1, f"--{option} {spec!r} names {len(files)} files; give one file per split")
    path = files[0]
    kind = file_kind(path)
    check(kind in FORMATS, f"--{option} {path!r}: evaluate reads {', '.join(FORMATS)} files (a text column and a"
                           " label column), not {kind}; convert it")
    with open_binary(path, storage_options) as f:
        data = f.read()
    check(len(data) > 0, f"--{option} {path!r} is empty; give labelled rows")
    columns = [text_column] + ([pair_column] if pair_column else []) + [label_column]
    records = {"csv": _csv, "jsonl": _jsonl, "parquet": _parquet}[kind](path, data, columns)
    rows = Rows(pairs=[] if pair_column else None)
    fixes = {text_column: "--text_column", pair_column: "--text_pair_column", label_column: "--label_column"}
    for where, record in records:
        missing = [c for c in columns if c not in record]
        if missing:
            raise MLMError(f"{path} {where} has no {missing[0]!r} field (has {sorted(record)}); pass"
                           f" {fixes[missing[0]]} NAME")
        label = _label(record[label_column])
        check(label is not None, f"{path} {where}: the label ({label_column!r}) is empty; give every row a label or"
                                 " remove the row")
        for column in columns[:-1]:
            value = record[column]
            if not (isinstance(value, str) and value.strip()):
                found = "empty" if value is None or isinstance(value, str) else f"{type(value).__name__}, not text"
                raise MLMError(f"{path} {where}: the {column!r} field is {found}; fix or remove that row")
        rows.texts.append(record[text_column])
        if pair_column:
            rows.pairs.append(record[pair_column])
        rows.labels.append(label)
    check(len(rows) > 0, f"--{option} {path!r} has no rows; give labelled rows")
    return rows


def _text(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MLMError(f"{path} is not UTF-8 text (line {line}, byte {e.start}); convert it, e.g. iconv -f latin1"
                       " -t utf-8") from None


def _csv(path: str, data: bytes, columns: list[str]):
    reader = csv.DictReader(io.StringIO(_text(path, data), newline=""),
                            delimiter="\t" if path.lower().split("?")[0].endswith(".tsv") else ",")
    try:
        header = reader.fieldnames or []
        for column in columns:
            check(column in header, f"{path} has no {column!r} column (columns: {header}); pass the column's name"
                                    f" ({_option_of(column, columns)} NAME)")
        for row in reader:
            yield f"line {reader.line_num}", {k: v for k, v in row.items() if k is not None}
    except csv.Error as e:
        raise MLMError(f"{path} line {reader.line_num} is not valid CSV ({e}); fix that line") from None


def _option_of(column: str, columns: list[str]) -> str:
    if column == columns[0]:
        return "--text_column"
    return "--label_column" if column == columns[-1] else "--text_pair_column"


def _jsonl(path: str, data: bytes, columns: list[str]):
    for number, line in enumerate(_text(path, data).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MLMError(f"{path} line {number} is not valid JSON ({e.msg}); write one JSON object per"
                           " line") from None
        check(isinstance(record, dict), f"{path} line {number} is not a JSON object; write one object per line")
        yield f"line {number}", record


def _parquet(path: str, data: bytes, columns: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MLMError(f"{path} is not a readable Parquet file ({first})") from None
    for column in columns:
        check(column in table.column_names, f"{path} has no {column!r} column (columns: {table.column_names});"
                                            f" pass the column's name ({_option_of(column, columns)} NAME)")
    values = {c: table.column(c).to_pylist() for c in columns}
    for row in range(table.num_rows):
        yield f"row {row + 1}", {c: values[c][row] for c in columns}


def parse_split(split: str) -> list[float]:
    try:
        parts = [float(p) for p in split.split(",")]
    except ValueError:
        parts = []
    check(len(parts) in (2, 3) and all(p > 0 for p in parts) and abs(sum(parts) - 1) < 1e-6,
          f"--split {split!r}: give train,test or train,validation,test shares that add up to 1, e.g. 0.8,0.1,0.1")
    return parts


def split_rows(rows: Rows, shares: list[float], seed: int) -> list[Rows]:
    """`rows` cut into len(shares) parts, class by class (each class in each part in its share), by a seeded
    shuffle: the same seed gives the same parts."""
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in shares]
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(rows.labels):
        by_class.setdefault(label, []).append(i)
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        start, total = 0, 0.0
        for k, share in enumerate(shares):
            total += share
            end = len(members) if k == len(shares) - 1 else round(total * len(members))
            parts[k] += members[start:end]
            start = end
    return [rows.subset(sorted(p)) for p in parts]


def load_task(train_file: str, validation_file: str | None, test_file: str | None, split: str | None,
              split_seed: int, text_column: str, text_pair_column: str | None, label_column: str,
              storage_options: dict | None = None) -> Task:
    """The splits and classes, checked: two classes at least, every test (and validation) label seen in training."""
    def read(spec: str, option: str) -> Rows:
        return read_rows(spec, option, text_column, text_pair_column, label_column, storage_options)

    check(not (split and test_file), "--split cuts --train_file when there is no --test_file; give one or the other")
    train = read(train_file, "train_file")
    sources = {"train": train_file}
    if test_file:
        test, sources["test"] = read(test_file, "test_file"), test_file
        validation = read(validation_file, "validation_file") if validation_file else Rows(pairs=train.pairs and [])
        if validation_file:
            sources["validation"] = validation_file
    else:
        shares = parse_split(split or "0.8,0.1,0.1")
        check(not (validation_file and len(shares) == 3), "--validation_file is given: --split cuts train and test"
                                                          " only (e.g. 0.9,0.1)")
        parts = split_rows(train, shares, split_seed)
        train, test = parts[0], parts[-1]
        validation = parts[1] if len(parts) == 3 else (read(validation_file, "validation_file") if validation_file
                                                       else Rows(pairs=train.pairs and []))
        sources["split"] = f"{split or '0.8,0.1,0.1'} of {train_file} (seed {split_seed})"
    classes = sorted(set(train.labels))
    check(len(classes) >= 2, f"the training data has one class only ({classes[0]!r}); a classifier needs two or"
                             f" more: check --label_column {label_column!r}")
    check(len(test) > 0, "the test split is empty; give more rows, a larger test share or --test_file")
    for name, rows in (("test", test), ("validation", validation)):
        unseen = sorted(set(rows.labels) - set(classes))
        check(not unseen, f"{name} labels never seen in training: {unseen[:5]}{' ...' if len(unseen) > 5 else ''};"
                          " every class needs training rows (or remove those rows)")
    # (a presigned URL's signature is not written to the report)
    sources = {k: v.split("?", 1)[0] if is_url(v) else v for k, v in sources.items()}
    return Task(train, validation, test, classes, sources)
