"""Reading from a store fsspec reaches (s3://, gs://, http(s)://): the file system for a URL, what the store says
about an object (size and identity, asked once per run), a forward stream that resumes at the byte a dropped
connection stopped, and the store's errors turned into one line naming the URL and the fix.

Local paths never come here: `corpus.py` sends them through `os`, and only URLs through this module.
"""

from __future__ import annotations

import io
import json
import re
import time

import fsspec

from mlm_lightning.errors import MLMError, check, first_line

REMOTE_BLOCK = 8 << 20  # bytes fetched per request from an object store (memory stays a few blocks)
RETRIES = 4  # a dropped connection is retried this many times, waiting RETRY_WAIT_S * 2**attempt in between
RETRY_WAIT_S = 1.0
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # pip install 'mlm-lightning[EXTRA]'


def is_url(path: str) -> bool:
    """A path fsspec should open (`s3://b/k`, `https://...`); plain paths and `file://` stay with `os`."""
    return bool(re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+://", str(path))) and not str(path).startswith("file://")


def without_query(path: str) -> str:
    return path.split("?", 1)[0] if is_http(path) else path

# -- the store: fsspec for URLs, with retries and one-line errors -------------------------------------------
SECRET = re.compile(r"key|secret|token|password|credential|session", re.IGNORECASE)


def redacted(options):
    """`options` with the values of secret-looking keys (key, secret, token, ...) replaced: safe to save."""
    if isinstance(options, dict):
        return {k: "***" if SECRET.search(str(k)) and not isinstance(v, (dict, list)) else redacted(v)
                for k, v in options.items()}
    if isinstance(options, list):
        return [redacted(v) for v in options]
    return options


def filesystem(url: str, storage_options: dict | None):
    """(fsspec file system, path inside it) for `url`."""
    protocol = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError:
        extra = EXTRAS.get(protocol)
        fix = f"pip install 'mlm-lightning[{extra}]'" if extra else "install the fsspec package for it"
        raise MLMError(f"reading {protocol}:// URLs ({url}) needs a file system package: {fix}") from None
    except (ValueError, TypeError) as e:  # unknown protocol, or storage_options it does not take
        raise MLMError(f"cannot open {url} ({first_line(e)}); check the URL and --data.storage_options") from None


_TRANSIENT = {  # by class name, so that neither aiohttp nor botocore needs importing (either may be absent)
    "ConnectionError", "TimeoutError", "IncompleteRead", "ClientConnectionError", "ClientPayloadError",
    "ServerDisconnectedError", "ClientOSError", "EndpointConnectionError", "ConnectionClosedError",
    "ReadTimeoutError", "ConnectTimeoutError", "ResponseStreamingError", "ServerTimeoutError",
}


def _causes(e: BaseException) -> list[BaseException]:
    out = []
    while e is not None and e not in out and len(out) < 8:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _is_transient(e: BaseException) -> bool:
    return any(c.__name__ in _TRANSIENT for x in _causes(e) for c in type(x).__mro__)


def _status(e: BaseException) -> int | None:
    """The HTTP status an aiohttp/botocore error carries, if any."""
    for x in _causes(e):
        status = getattr(x, "status", None)
        if isinstance(status, int):
            return status
    return None


def _store_error(e: BaseException, url: str) -> MLMError:
    """One line for a store's failure, naming the URL and the fix."""
    names = {c.__name__ for x in _causes(e) for c in type(x).__mro__}
    text = first_line(e)
    status = _status(e)
    if _is_transient(e):  # (before "not found": fsspec's http reports a refused connection as FileNotFoundError)
        text = first_line(next(x for x in _causes(e) if any(c.__name__ in _TRANSIENT for c in type(x).__mro__)))
        return MLMError(f"cannot read {url}: the connection failed {RETRIES + 1} times ({text}); check the network"
                        " (and endpoint_url in --data.storage_options), then run again")
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return MLMError(
            f"no credentials to read {url}: set them the usual way (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or"
            " AWS_PROFILE; GOOGLE_APPLICATION_CREDENTIALS for gs://), or pass --data.storage_options"
            " '{\"anon\": true}' for a public bucket"
        )
    if isinstance(e, PermissionError) or status in (401, 403):
        return MLMError(f"access denied to {url} ({text}): check the credentials and that they may read it")
    if isinstance(e, FileNotFoundError) or status == 404:
        if "bucket" in text.lower():
            return MLMError(f"no such bucket: {url} ({text}); check the bucket name (and endpoint_url in"
                            " --data.storage_options)")
        return MLMError(f"{url} does not exist (no such key or file); check the path")
    return MLMError(f"cannot read {url} ({text})")


def retrying(url: str, call):
    """`call()`, retried with backoff while the connection fails; any store error becomes one MLMError line."""
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except MLMError:
            raise
        except Exception as e:  # noqa: BLE001 - classified here, re-raised as one line
            if attempt == RETRIES or not _is_transient(e):
                raise _store_error(e, url) from e  # (the chain is for --debug; the CLI prints one line)
            time.sleep(RETRY_WAIT_S * 2**attempt)
    raise AssertionError("unreachable")


def is_http(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))

# what identifies an object's content, by store: S3 (ETag, VersionId, LastModified), GCS (etag, generation,
# updated), http (ETag, Last-Modified), others (mtime)
IDENTITY_KEYS = ("ETag", "etag", "VersionId", "generation", "LastModified", "updated", "Last-Modified", "mtime")


# What the store said about each URL when it was last resolved (or first asked about): its size and identity are
# needed several times per run (tokenizer key, data key, progress total), one request each otherwise.
_INFO: dict[tuple[str, str], dict] = {}


def _info_key(url: str, storage_options: dict | None) -> tuple[str, str]:
    return url, json.dumps(storage_options or {}, sort_keys=True, default=str)


def object_info(url: str, storage_options: dict | None) -> dict:
    key = _info_key(url, storage_options)
    if key not in _INFO:
        fs, path = filesystem(url, storage_options)
        _INFO[key] = retrying(url, lambda: fs.info(path))
    return _INFO[key]


class RemoteStream(io.RawIOBase):
    """A remote file as a forward stream: `REMOTE_BLOCK` bytes per request (an http URL: one streamed GET).

    A dropped connection is reopened at the byte it stopped (seek, or for an http stream skip ahead), up to
    `RETRIES` times with backoff; fsspec's own retries (s3fs has some) come first."""

    def __init__(self, url: str, storage_options: dict | None):
        self.url, self.storage_options = url, storage_options
        self.fs, self.path = filesystem(url, storage_options)
        self.pos, self.f = 0, None
        retrying(url, self._open)  # a missing key or bad credentials fail here, before any reading

    def _open(self) -> None:
        if is_http(self.url):  # http: one streamed GET (works with servers that ignore Range)
            f = self.fs.open(self.path, "rb", block_size=0)
            skip = self.pos
            while skip:
                chunk = f.read(min(skip, REMOTE_BLOCK))
                check(bool(chunk), f"{self.url} is shorter than before; it changed while being read, run again")
                skip -= len(chunk)
        else:
            f = self.fs.open(self.path, "rb", block_size=REMOTE_BLOCK, cache_type="readahead")
            f.seek(self.pos)
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        def read() -> bytes:
            if self.f is None:
                self._open()
            try:
                return self.f.read(len(buffer))
            except BaseException:
                self._drop()
                raise

        data = retrying(self.url, read)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def _drop(self) -> None:
        f, self.f = self.f, None
        try:
            if f is not None:
                f.close()
        except Exception:  # noqa: BLE001 - a broken connection may fail to close too; it is dropped anyway
            pass

    def close(self) -> None:
        self._drop()
        super().close()


def remember(found: dict, url_of, storage_options: dict | None) -> None:
    """Keep what a listing said of each file (`found`: path -> info; `url_of`: a listed path's URL): an object
    store's entries carry size and ETag, so the run asks no more about them (http's do not, and are asked)."""
    for p, i in found.items():
        _INFO.pop(_info_key(url_of(p), storage_options), None)
        if i.get("type") == "file" and i.get("size") is not None and any(k in i for k in IDENTITY_KEYS):
            _INFO[_info_key(url_of(p), storage_options)] = i


def open_stream(url: str, storage_options: dict | None = None) -> io.BufferedReader:
    """A buffered binary stream of `url` (`RemoteStream`: never downloaded first)."""
    return io.BufferedReader(RemoteStream(url, storage_options), buffer_size=1 << 20)
