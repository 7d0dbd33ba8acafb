"""A `serve` process and its HTTP client, and comparisons of fill-mask answers (ours against the pipeline's)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support import ROOT


class Server:
    """`mlm-lightning serve --port 0 ...` in its own process, started in `cwd`; stderr is collected."""

    def __init__(self, model: str, cwd: Path, *args: str):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlm_lightning.cli", "serve", "--model", model, "--port", "0", *args],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()  # drain stderr so the server never blocks on it
        if not self.ready.wait(120) or self.proc.poll() is not None:
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + self.log)
        self.url = re.search(r"http://[^ ]+", next(x for x in self.lines if "serving" in x)).group(0)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "serving" in line:
                self.ready.set()
        self.ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, float]:
        """Send `signum`; (exit code, seconds until the process was gone)."""
        start = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return code, time.monotonic() - start


def post(url: str, body, path: str = "/api/fill-mask", raw: bool = False) -> tuple[int, object]:
    """POST JSON (or raw bytes) -> (status, decoded JSON body)."""
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + path, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def assert_same_candidates(ours: list[dict], expected: list[dict], tol: float = 1e-4) -> None:
    """One mask's candidates: the same scores (within `tol`), keys, tokens and sequences, rank by rank.

    Two candidates whose scores are within float noise (a random model has near ties) may come in either order,
    depending on the shapes of the matmuls; they are compared as a set."""
    assert len(ours) == len(expected)
    assert all(set(c) == {"score", "token", "token_str", "sequence"} for c in ours)
    for a, b in zip(ours, expected, strict=True):
        assert abs(a["score"] - b["score"]) < tol, (a, b)
    def key(c):
        return (c["token"], c["token_str"], c["sequence"])

    rank = 0
    while rank < len(ours):  # group ranks whose expected scores tie within 1e-6
        end = rank + 1
        while end < len(ours) and abs(expected[end]["score"] - expected[end - 1]["score"]) < 1e-6:
            end += 1
        assert sorted(map(key, ours[rank:end])) == sorted(map(key, expected[rank:end])), (ours, expected)
        rank = end


def assert_same_answer(ours, expected) -> None:
    """A pipeline answer for one text: a list of candidates (one mask) or a list of those (several)."""
    if expected and isinstance(expected[0], list):
        assert isinstance(ours[0], list) and len(ours) == len(expected)
        for a, b in zip(ours, expected, strict=True):
            assert_same_candidates(a, b)
    else:
        assert_same_candidates(ours, expected)
