"""The measurement scripts never replace what they did not make: a user's non-empty output dir is refused."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("command", [
    ["bash", "scripts/bench_headless.sh", "no-encoder-needed", "{out}"],
    [sys.executable, "scripts/sweep_default.py", "--only", "today", "--workdir", "{out}"],
])
def test_a_users_output_dir_is_refused_and_kept(tmp_path, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    done = subprocess.run([c.format(out=out) for c in command], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "was not made by this script" in done.stderr
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
