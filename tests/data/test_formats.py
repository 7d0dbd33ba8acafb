"""Compressed and Parquet corpora read like plain text; every error names the file and the line or row."""

import bz2
import gzip
import json
import lzma

import pytest
import zstandard

from mlm_lightning.data import corpus
from mlm_lightning.errors import MLMError
from tests.support.text import sentences

COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}


def jsonl(lines):
    return "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(lines))


def csv_text(lines):
    return "id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(lines))


@pytest.mark.parametrize("compression", sorted(COMPRESS))
@pytest.mark.parametrize("fmt, render", [(".txt", lambda ls: "\n".join(ls) + "\n"), (".jsonl", jsonl),
                                         (".csv", csv_text)])
def test_compressed_files_read_like_plain_ones(tmp_path, compression, fmt, render):
    lines = sentences(50)
    path = tmp_path / f"a{fmt}{compression}"
    path.write_bytes(COMPRESS[compression](render(lines).encode()))
    assert corpus.resolve_files(str(tmp_path)) == [str(path)]  # found in a directory by its double suffix
    reader = corpus.CorpusReader([str(path)])
    assert list(reader) == lines
    assert reader.bytes_done() == path.stat().st_size  # progress counts stored bytes


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = sentences(30)
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": list(range(31)), "body": lines + [None]}), path, row_group_size=7)
    assert list(corpus.iter_texts([str(path)], "body")) == lines  # null rows skipped like blank lines
    with pytest.raises(MLMError, match=r"a.parquet has no 'text' column \(columns: \['id', 'body'\]\)"):
        list(corpus.iter_texts([str(path)]))
    with pytest.raises(MLMError, match=r"a.parquet column 'id' holds int64, not text"):
        list(corpus.iter_texts([str(path)], "id"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(MLMError, match=r"bad.parquet is not a readable Parquet file"):
        list(corpus.iter_texts([str(tmp_path / "bad.parquet")]))


@pytest.mark.parametrize("value, found", [(3, "int"), (["a"], "list"), (None, "null"), ({"a": 1}, "dict")])
def test_non_string_jsonl_field_is_named(tmp_path, value, found):
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress((jsonl(["fine"]) + json.dumps({"text": value}) + "\n").encode()))
    with pytest.raises(MLMError) as e:
        list(corpus.iter_texts([str(path)]))
    assert str(e.value).startswith(f"{path} line 2: the 'text' field is {found}, not a string")


def test_errors_in_compressed_files_name_file_and_line(tmp_path):
    bad_json = tmp_path / "b.jsonl.zst"
    bad_json.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "x"}\n{oops\n'))
    with pytest.raises(MLMError, match=r"b.jsonl.zst line 2 is not valid JSON"):
        list(corpus.iter_texts([str(bad_json)]))
    latin = tmp_path / "l.txt.xz"
    latin.write_bytes(lzma.compress("fine\ncaf\xe9\n".encode("latin1")))
    with pytest.raises(MLMError, match=r"l.txt.xz is not UTF-8 \(line 2, byte 8"):
        list(corpus.iter_texts([str(latin)]))
    truncated = tmp_path / "t.txt.gz"
    truncated.write_bytes(gzip.compress(("\n".join(sentences(2000)) + "\n").encode())[:3000])
    with pytest.raises(MLMError, match=r"t.txt.gz is corrupt or truncated after line \d+"):
        list(corpus.iter_texts([str(truncated)]))
    not_gzip = tmp_path / "n.txt.gz"
    not_gzip.write_bytes(b"plain text, not gzip\n")
    with pytest.raises(MLMError, match=r"n.txt.gz is corrupt or truncated after line 0"):
        list(corpus.iter_texts([str(not_gzip)]))
