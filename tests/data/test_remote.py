"""Corpora at URLs: a real S3-compatible server (moto's server mode) and a local http.server, both on 127.0.0.1.

From s3:// or http:// the cache holds the same token arrays as from the local copy; a second run reads nothing from
the store; a changed object gets a new key; a dropped connection is resumed; every store failure is one line, exit 2.
"""

import functools
import glob
import http.server
import json
import os
import threading

import numpy as np
import pytest
import zstandard

from mlm_lightning.data import cache, corpus
from mlm_lightning.data import module as data_module
from mlm_lightning.data import remote as store
from mlm_lightning.data.cache import TokenStream
from mlm_lightning.data.module import MLMDataModule
from tests.support.cli import fit_args, free_port, run_cli, two_nodes
from tests.support.text import save_to_disk, sentences

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def jsonl_zst(lines) -> bytes:
    return zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in lines).encode())


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory):
    """corpus/a.jsonl.zst and corpus/sub/b.txt: the local copy of what goes into the bucket."""
    root = tmp_path_factory.mktemp("local") / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.jsonl.zst").write_bytes(jsonl_zst(sentences(400)))
    (root / "sub" / "b.txt").write_text("\n".join(sentences(100, seed=1)) + "\n")
    return root


@pytest.fixture(scope="module")
def s3(local_corpus):
    """(endpoint URL, boto3 client) of a moto S3 server holding s3://corp/corpus/ = `local_corpus`."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="corp")
    for path in sorted(local_corpus.rglob("*")):
        if path.is_file():
            client.put_object(Bucket="corp", Key=f"corpus/{path.relative_to(local_corpus)}", Body=path.read_bytes())
    yield endpoint, client
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def options(endpoint: str, **extra) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint}, **extra}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from mlm_lightning.data.tokenizer import train_wordpiece

    out = str(tmp_path_factory.mktemp("tok") / "wp")
    train_wordpiece(sentences(300), out, 200, 64)
    return out


def prepared(train, cache_dir, **kw) -> MLMDataModule:
    kw.setdefault("vocab_size", 200)
    dm = MLMDataModule(train_files=train, cache_dir=str(cache_dir), max_length=32, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def arrays(dm) -> list[np.ndarray]:
    return [np.asarray(getattr(TokenStream.load(dm._data_dir(), split), kind))
            for split in ("train", "val") for kind in ("tokens", "offsets", "word_starts")]


def assert_same_cache(a, b) -> None:
    for x, y in zip(arrays(a), arrays(b), strict=True):
        assert np.array_equal(x, y)


def test_s3_prefix_gives_the_same_token_arrays_as_the_local_copy(s3, local_corpus, tokenizer_dir, tmp_path):
    endpoint, _ = s3
    files = corpus.resolve_files("s3://corp/corpus", storage_options=options(endpoint))
    assert files == ["s3://corp/corpus/a.jsonl.zst", "s3://corp/corpus/sub/b.txt"]  # the prefix, listed
    assert corpus.resolve_files("s3://corp/corpus/*.zst", storage_options=options(endpoint)) == files[:1]  # a glob
    remote = prepared("s3://corp/corpus/", tmp_path / "a", tokenizer=tokenizer_dir, storage_options=options(endpoint))
    local = prepared(str(local_corpus), tmp_path / "b", tokenizer=tokenizer_dir)
    assert len(remote.datasets["train"]) > 20
    assert_same_cache(remote, local)
    reader = corpus.CorpusReader(files, storage_options=options(endpoint))
    assert list(reader) == list(corpus.CorpusReader(local.train_paths))
    assert reader.total_bytes == reader.bytes_done() == sum(p.stat().st_size for p in local_corpus.rglob("*.*"))


def test_second_run_reads_nothing_from_the_bucket_and_a_changed_object_gets_a_new_key(s3, tmp_path, monkeypatch):
    endpoint, client = s3
    client.put_object(Bucket="corp", Key="changing/a.jsonl.zst", Body=jsonl_zst(sentences(300, seed=4)))
    url, so = "s3://corp/changing/a.jsonl.zst", options(endpoint)
    first = prepared(url, tmp_path, storage_options=so)  # the tokenizer too is trained from the bucket
    tokenizer = first._tokenizer_dir()

    def boom(*a, **k):
        raise AssertionError("read or tokenized again")

    with monkeypatch.context() as m:
        for target, name in ((corpus, "open_binary"), (data_module, "build_cache"), (data_module, "train_tokenizer"),
                             (cache, "_tokenize_into")):
            m.setattr(target, name, boom)
        second = prepared(url, tmp_path, storage_options=so)
    assert second._data_dir() == first._data_dir()
    assert_same_cache(first, second)
    client.put_object(Bucket="corp", Key="changing/a.jsonl.zst", Body=jsonl_zst(sentences(600, seed=5)))
    changed = prepared(url, tmp_path, storage_options=so, tokenizer=tokenizer)
    assert changed._data_dir() != first._data_dir()
    assert len(changed.datasets["train"]) > len(first.datasets["train"])


def test_save_to_disk_dir_in_a_bucket(s3, tmp_path):
    endpoint, client = s3
    save_to_disk(tmp_path / "ds", sentences(80, seed=3))
    for path in (tmp_path / "ds").iterdir():
        client.put_object(Bucket="corp", Key=f"ds/{path.name}", Body=path.read_bytes())
    files = corpus.resolve_files("s3://corp/ds", storage_options=options(endpoint))
    assert files == ["s3://corp/ds/data-00000-of-00002.arrow", "s3://corp/ds/data-00001-of-00002.arrow"]
    assert list(corpus.iter_texts(files, storage_options=options(endpoint))) == sentences(80, seed=3)


def test_a_dropped_s3_read_resumes_at_the_same_byte(s3, monkeypatch):
    import s3fs

    endpoint, client = s3
    lines = sentences(120_000, seed=7)  # ~3.5 MB: several 1 MB reads
    client.put_object(Bucket="corp", Key="big/a.txt", Body=("\n".join(lines) + "\n").encode())
    real, calls = s3fs.core.S3File.read, []

    def flaky(self, length=-1):
        calls.append(self.loc)
        if len(calls) == 2:  # the second read, 1 MB in
            raise ConnectionResetError("Connection reset by peer")
        return real(self, length)

    monkeypatch.setattr(s3fs.core.S3File, "read", flaky)
    monkeypatch.setattr(store, "RETRY_WAIT_S", 0.01)
    assert list(corpus.iter_texts(["s3://corp/big/a.txt"], storage_options=options(endpoint))) == lines
    assert calls[1] == calls[2] == 1 << 20  # reopened where it stopped


def test_parquet_in_a_bucket(s3, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    endpoint, client = s3
    pq.write_table(pa.table({"body": sentences(70)}), tmp_path / "a.parquet", row_group_size=20)
    client.put_object(Bucket="corp", Key="pq/a.parquet", Body=(tmp_path / "a.parquet").read_bytes())
    reader = corpus.CorpusReader(["s3://corp/pq/a.parquet"], "body", options(endpoint))
    assert list(reader) == sentences(70) and reader.bytes_done() == (tmp_path / "a.parquet").stat().st_size


def test_secrets_in_storage_options_are_not_saved_in_hyperparameters(local_corpus, tmp_path):
    so = {"key": "AKIA1", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://x", "aws_session_token": "t"}}
    dm = MLMDataModule(train_files=str(local_corpus), cache_dir=str(tmp_path), storage_options=so)
    assert dm.hparams.storage_options == {"key": "***", "secret": "***",
                                          "client_kwargs": {"endpoint_url": "http://x", "aws_session_token": "***"}}
    assert dm.storage_options == so  # (used as given)


def test_secrets_in_storage_options_are_not_written_to_the_runs_config(local_corpus, tmp_path):
    so = {"key": "AKIA1", "secret": "s3cr3t"}
    root = tmp_path / "run"
    assert run_cli(*fit_args(str(local_corpus), root, "--trainer.max_steps", "1", "--data.storage_options",
                             json.dumps(so), "--data.cache_dir", str(tmp_path / "cache"))) == 0
    [config] = root.glob("lightning_logs/version_*/config.yaml")
    text = config.read_text()
    assert "storage_options" in text and "AKIA1" not in text and "s3cr3t" not in text


def test_fingerprint_of_local_files_is_unchanged(tmp_path):
    """Caches made before URLs were read stay valid: the local key is still path|size|mtime_ns."""
    import hashlib

    path = tmp_path / "a.txt"
    path.write_text("hello\n")
    st = os.stat(path)
    h = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(repr((1, "x")).encode())
    assert corpus.fingerprint([str(path)], 1, "x") == h.hexdigest()[:16]


def one_line_error(capsys, *args) -> str:
    code = run_cli("fit", "--data.vocab_size", "200", *args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and err.startswith("mlm-lightning: error: "), err
    return err


def test_missing_key_missing_bucket_bad_credentials_and_access_denied_exit_2_with_one_line(s3, capsys):
    endpoint, _ = s3
    so = json.dumps(options(endpoint))
    err = one_line_error(capsys, "--data.train_files", "s3://corp/corpus/nope.jsonl", "--data.storage_options", so)
    assert "s3://corp/corpus/nope.jsonl does not exist (no such key" in err
    err = one_line_error(capsys, "--data.train_files", "s3://no-such-bucket/a.txt", "--data.storage_options", so)
    assert "no such bucket: s3://no-such-bucket/a.txt" in err
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    iam = boto3.client("iam", endpoint_url=endpoint)
    iam.create_user(UserName="nobody")  # a user with no policy: may read nothing
    key = iam.create_access_key(UserName="nobody")["AccessKey"]
    saved = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = 0, 0  # IAM checks from now on
    try:
        bad = json.dumps(options(endpoint, key="AKIAWRONGWRONGWRONG1", secret="wrong", skip_instance_cache=True))
        wrong = one_line_error(capsys, "--data.train_files", "s3://corp/corpus/", "--data.storage_options", bad)
        nobody = json.dumps(options(endpoint, key=key["AccessKeyId"], secret=key["SecretAccessKey"],
                                    skip_instance_cache=True))
        denied = one_line_error(capsys, "--data.train_files", "s3://corp/corpus/a.jsonl.zst",
                                "--data.storage_options", nobody)
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
    assert "access denied to s3://corp/corpus/" in wrong and "check the credentials" in wrong
    assert "access denied to s3://corp/corpus/a.jsonl.zst" in denied


def test_no_credentials_is_one_line(s3, capsys, monkeypatch, tmp_path):
    endpoint, _ = s3
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    so = json.dumps(options(endpoint, skip_instance_cache=True))
    err = one_line_error(capsys, "--data.train_files", "s3://corp/corpus/", "--data.storage_options", so)
    assert "no credentials to read s3://corp/corpus/" in err and "AWS_PROFILE" in err


# -- http(s):// ----------------------------------------------------------------------------------------------
class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory (listings included); `drop` names files whose first GET stops half way."""

    drop: set = set()
    gets: list = []
    heads: list = []

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self):
        self.heads.append(self.path)
        super().do_HEAD()

    def do_GET(self):
        self.gets.append(self.path)
        name = self.path.lstrip("/")
        if name in self.drop:
            self.drop.discard(name)
            body = open(self.translate_path(self.path), "rb").read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the connection drops mid-body
            return
        super().do_GET()


@pytest.fixture
def web(local_corpus):
    root = local_corpus.parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Handler.gets.clear()
    Handler.heads.clear()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_http_gives_the_same_token_arrays_and_resumes_a_dropped_connection(web, local_corpus, tokenizer_dir,
                                                                            tmp_path, monkeypatch):
    monkeypatch.setattr(store, "RETRY_WAIT_S", 0.01)
    files = corpus.resolve_files(f"{web}/corpus/")  # the server's directory listing, followed
    assert files == [f"{web}/corpus/a.jsonl.zst", f"{web}/corpus/sub/b.txt"]
    Handler.drop = {"corpus/a.jsonl.zst"}
    Handler.heads.clear()
    remote = prepared(f"{web}/corpus/", tmp_path / "a", tokenizer=tokenizer_dir)
    assert Handler.gets.count("/corpus/a.jsonl.zst") == 2  # dropped half way, then read again from where it stopped
    # its metadata asked for once (resolve; reused by the tokenizer key, the data key and the progress total), plus
    # what fsspec asks when it opens the stream: not once per use
    assert Handler.heads.count("/corpus/sub/b.txt") <= 2
    assert_same_cache(remote, prepared(str(local_corpus), tmp_path / "b", tokenizer=tokenizer_dir))


def test_a_query_string_is_not_part_of_the_name(web, local_corpus):
    signed = [f"{web}/corpus/a.jsonl.zst?X-Amz-Signature={sig}" for sig in ("abc", "def")]
    assert corpus.file_kind(signed[0]) == "jsonl"  # read as .jsonl.zst, not as text
    assert list(corpus.iter_texts(signed[:1])) == sentences(400)
    assert corpus.fingerprint(signed[:1]) == corpus.fingerprint(signed[1:])  # signed again: the same key


def test_http_errors_are_one_line(web, capsys, monkeypatch):
    monkeypatch.setattr(store, "RETRY_WAIT_S", 0.01)
    err = one_line_error(capsys, "--data.train_files", f"{web}/corpus/nope.txt")
    assert f"{web}/corpus/nope.txt does not exist" in err
    port = free_port()  # nothing listens there
    err = one_line_error(capsys, "--data.train_files", f"http://127.0.0.1:{port}/a.txt")
    assert f"cannot read http://127.0.0.1:{port}/a.txt: the connection failed {store.RETRIES + 1} times" in err


def test_missing_extra_names_the_pip_install(monkeypatch):
    import fsspec

    def no_gcsfs(*a, **k):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_gcsfs)
    with pytest.raises(corpus.MLMError, match=r"pip install 'mlm-lightning\[gcs\]'"):
        corpus.resolve_files("gs://bucket/corpus/")


@pytest.mark.slow
def test_fit_from_s3(s3, tmp_path):
    endpoint, _ = s3
    code = run_cli(*fit_args("s3://corp/corpus/", tmp_path / "run", "--trainer.max_steps", "3",
                             "--data.storage_options", json.dumps({"endpoint_url": endpoint}),
                             "--data.cache_dir", str(tmp_path / "cache")))
    assert code == 0
    assert list((tmp_path / "run").rglob("last.ckpt"))


@pytest.mark.slow
def test_each_node_tokenizes_the_bucket_once_into_its_own_cache(s3, tmp_path):
    """Two nodes (simulated with gloo), node-local caches: process 0 trains the vocabulary from the bucket and
    tokenizes into node 0's cache, the first process of node 1 into node 1's, under the same key."""
    endpoint, _ = s3
    two_nodes(tmp_path, lambda node: fit_args("s3://corp/corpus/", tmp_path / f"run{node}", "--trainer.max_steps",
                                              "2", "--data.storage_options", json.dumps(options(endpoint))))
    keys = [[os.path.basename(os.path.dirname(m)) for m in glob.glob(f"{tmp_path}/cache{n}/data/*/meta.json")]
            for n in (0, 1)]
    assert len(keys[0]) == 1 and keys[0] == keys[1]  # each node tokenized it once, into its own cache
    assert len(glob.glob(f"{tmp_path}/cache1/tokenizers/*/tokenizer.json")) == 1  # given by process 0, not trained
