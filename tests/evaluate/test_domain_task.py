"""scripts/domain_task.py: the standard-library-area task, split by module, and its safe output."""

import csv
import subprocess
import sys

from tests.support import ROOT


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "domain_task.py"), *args], capture_output=True,
                          text=True)


def test_the_task_holds_out_whole_modules_and_every_area_is_in_train_and_test(tmp_path):
    done = script(str(tmp_path))
    assert done.returncode == 0, done.stderr
    splits = {}
    for name in ("train", "validation", "test"):
        with open(tmp_path / f"{name}.csv", encoding="utf-8", newline="") as f:
            splits[name] = list(csv.DictReader(f))
    modules = {name: {r["module"] for r in rows} for name, rows in splits.items()}
    assert not modules["test"] & modules["train"] and not modules["validation"] & modules["train"]
    areas = {"text", "files", "internet", "concurrency", "formats", "numbers"}
    assert {r["label"] for r in splits["train"]} == areas == {r["label"] for r in splits["test"]}
    assert "concurrency" in done.stdout and "wrote" in done.stdout  # the class counts
    texts = [r["text"] for rows in splits.values() for r in rows]
    assert len(texts) == len(set(texts))  # a paragraph is in one split only


def test_a_file_it_did_not_write_is_kept(tmp_path):
    (tmp_path / "test.csv").write_text("my,own\n1,2\n")
    done = script(str(tmp_path))
    assert done.returncode == 2 and "is not a file this script wrote" in done.stderr
    assert (tmp_path / "test.csv").read_text() == "my,own\n1,2\n" and not (tmp_path / "train.csv").exists()
