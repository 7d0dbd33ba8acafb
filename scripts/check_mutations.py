"""Check tests/MUTATIONS.md: each row's mutation, applied to a copy of the package, makes the row's test fail.

    python scripts/check_mutations.py            # every row (several minutes: each row runs its test)
    python scripts/check_mutations.py --rows 1,4  # some rows
    python scripts/check_mutations.py --baseline  # also run each test unmutated (it must pass)
    python scripts/check_mutations.py --stale     # only check that each row's code is still there (seconds)

A row is `| guarantee | file | `old` | `new` | test |`: `old` must occur exactly once in `file` (a row whose code
moved says so, instead of passing by mutating nothing); `\\n` in old/new stands for a line break.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| *(\d+) *\|(.*?)\| *`([^`]+)` *\| *`([^`]*)` *\| *`([^`]*)` *\| *`([^`]+)` *\|\s*$")


def rows(table: Path) -> list[tuple[int, str, str, str, str, str]]:
    out = []
    for line in table.read_text(encoding="utf-8").splitlines():
        m = ROW.match(line)
        if m:
            n, guarantee, path, old, new, test = m.groups()
            out.append((int(n), guarantee.strip(), path, old.replace("\\n", "\n"), new.replace("\\n", "\n"), test))
    return out


def run(copy: Path, test: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", test]
    return subprocess.run(cmd, cwd=copy, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", help="comma-separated row numbers (default: all)")
    parser.add_argument("--baseline", action="store_true", help="also run each test without its mutation")
    parser.add_argument("--stale", action="store_true", help="only check that every row's code is still there")
    args = parser.parse_args()
    wanted = {int(r) for r in args.rows.split(",")} if args.rows else None
    bad = 0
    for n, guarantee, path, old, new, test in rows(ROOT / "tests" / "MUTATIONS.md"):
        if wanted and n not in wanted:
            continue
        with tempfile.TemporaryDirectory(prefix="mlm-mutation-") as tmp:
            copy = Path(tmp)
            for part in ("mlm_lightning", "tests", "configs", "scripts", "pyproject.toml", "README.md", "docs",
                         "mkdocs.yml", "examples"):
                src = ROOT / part
                if src.is_symlink():  # (configs/ points into the package: the copy's points into the copy)
                    os.symlink(os.readlink(src), copy / part)
                    continue
                (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / part)
            target = copy / path
            text = target.read_text(encoding="utf-8")
            if text.count(old) != 1:
                print(f"row {n}: STALE ({text.count(old)} matches of its code in {path}) - {guarantee}")
                bad += 1
                continue
            if args.stale:
                continue
            base = run(copy, test) if args.baseline else 0
            target.write_text(text.replace(old, new), encoding="utf-8")
            code = run(copy, test)
            ok = code == 1 and base == 0  # 1: tests ran and failed (2-5: an error, not a caught mutation)
            bad += not ok
            status = "caught" if ok else f"NOT CAUGHT (pytest exit {code}{', unmutated ' + str(base) if base else ''})"
            print(f"row {n}: {status} - {guarantee} [{test}]", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
