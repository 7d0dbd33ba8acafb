"""The measurement scripts: a user's non-empty output dir is refused and kept; the sweep scores on a clean split; the
thread benchmark prints each variant's share."""

import os
import subprocess
import sys

import pytest

from tests.support import ROOT

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


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_the_sweeps_baseline_corpus_holds_no_line_of_the_split_it_is_scored_on(tmp_path):
    """pydoc's topics repeat each other's text, so dropping the held-out topics alone leaves split lines in."""
    import importlib.util

    from mlm_lightning.data.offline import default_corpus_files
    spec = importlib.util.spec_from_file_location("sweep_default", ROOT / "scripts" / "sweep_default.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    held_out = default_corpus_files(str(tmp_path / "cache"))[1]
    split = set(open(held_out, encoding="utf-8").read().splitlines())
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    leaky = set(open(sweep.todays_corpus(str(tmp_path / "leaky.txt"), str(empty))).read().splitlines())
    assert len(leaky & split) > 10  # what the filter is for: many of the split's lines are in other topics
    old = set(open(sweep.todays_corpus(str(tmp_path / "old.txt"), held_out)).read().splitlines())
    assert not old & split and len(old) > 1000
    score = sweep.scoring_file(held_out, str(tmp_path / "score.txt"))
    assert open(score).read() == open(held_out).read() * sweep.DRAWS


@pytest.mark.slow
def test_the_thread_benchmark_prints_each_variants_share():
    done = subprocess.run([sys.executable, "scripts/bench_threads.py", "--seconds", "0.5", "--repeats", "1",
                           "--variants", "default,chosen"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("default ", "chosen "))]
    assert [r[0] for r in rows] == ["default", "chosen"], done.stdout
    for row in rows:
        alone, busy, share = map(float, row[-3:])
        assert alone > 0 and busy > 0 and abs(share - busy / alone) < 0.02, row
