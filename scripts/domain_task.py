"""A real labelled task from the offline corpus: each standard-library docstring paragraph, labelled by the area of
the standard library its module belongs to.

    python scripts/domain_task.py OUT_DIR    # writes OUT_DIR/{train,validation,test}.csv, prints class counts
    mlm-lightning evaluate MODEL random --train_file OUT_DIR/train.csv --validation_file OUT_DIR/validation.csv \\
        --test_file OUT_DIR/test.csv --mode probe

The rule, all of it fixed (the same files on every machine with the same CPython):
- the paragraphs are the offline corpus's docstring paragraphs (`mlm_lightning.data.offline.docstring_units`);
- a module's area is that of its top-level name in `AREAS` (`email/mime/text.py` is `email`'s: internet);
  modules in no area are left out, and so is a paragraph found in more than one module (boilerplate);
- the split is by module (a file): within each area, modules are ordered by a SHA-256 of their path; the first
  20% (at least one) are the test set, the next 10% (at least one) validation, the rest training. The test set's
  modules are never seen in training.
Columns: text, label, module.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mlm_lightning.data.offline import docstring_units  # noqa: E402
from mlm_lightning.files import atomic_file  # noqa: E402

AREAS = {
    "text": "string re sre_compile sre_parse sre_constants textwrap difflib stringprep codecs gettext locale shlex"
            " unicodedata",
    "files": "os pathlib shutil glob fnmatch tempfile filecmp fileinput stat posixpath ntpath genericpath io _pyio"
             " zipfile tarfile gzip bz2 lzma linecache",
    "internet": "socket ssl http urllib email smtplib poplib imaplib ftplib nntplib telnetlib socketserver xmlrpc"
                " ipaddress mailbox mimetypes webbrowser wsgiref cgi selectors asyncore asynchat smtpd",
    "concurrency": "threading multiprocessing concurrent asyncio queue sched subprocess _threading_local",
    "formats": "json csv xml html configparser pickle pickletools copyreg plistlib base64 netrc tomllib"
               " _compat_pickle shelve dbm sqlite3 quopri uu binhex",
    "numbers": "decimal _pydecimal fractions numbers statistics random colorsys",
}
AREA_OF = {module: area for area, modules in AREAS.items() for module in modules.split()}
TEST_SHARE, VALIDATION_SHARE = 0.2, 0.1
HEADER = ["text", "label", "module"]
SPLITS = ("train", "validation", "test")


def area(path: str) -> str | None:
    top = path.split("/", 1)[0]
    return AREA_OF.get(top[:-3] if top.endswith(".py") else top)


def rows() -> dict[str, list[list[str]]]:
    units = [(path, paras) for path, paras in docstring_units() if area(path)]
    seen = Counter(p for _, paras in units for p in set(paras))
    modules: dict[str, list[str]] = {}
    for path, _ in units:
        modules.setdefault(area(path), []).append(path)
    side = {}
    for paths in modules.values():
        paths.sort(key=lambda p: hashlib.sha256(p.encode()).hexdigest())
        n_test = max(1, round(TEST_SHARE * len(paths)))
        n_val = max(1, round(VALIDATION_SHARE * len(paths))) if len(paths) > 2 else 0
        for i, p in enumerate(paths):
            side[p] = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
    out = {s: [] for s in SPLITS}
    for path, paras in units:
        module = path[:-3].replace("/", ".").removesuffix(".__init__")
        out[side[path]] += [[p, area(path), module] for p in dict.fromkeys(paras) if seen[p] == 1]
    return out


def ours(path: str) -> bool:
    """A file this script wrote (its header), which it may replace; anything else is kept."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return next(csv.reader(f), None) == HEADER
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    out_dir = parser.parse_args().out_dir
    paths = {s: os.path.join(out_dir, f"{s}.csv") for s in SPLITS}
    for path in paths.values():
        if os.path.lexists(path) and (os.path.islink(path) or not ours(path)):
            print(f"domain_task: {path} exists and is not a file this script wrote; pick another OUT_DIR",
                  file=sys.stderr)
            return 2
    data = rows()
    if not data["train"]:
        print("domain_task: this Python has no standard-library sources to build the task from", file=sys.stderr)
        return 2
    for split, path in paths.items():
        with atomic_file(path) as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(HEADER)
            writer.writerows(data[split])
    print(f"{'area':<12} " + " ".join(f"{s:>10}" for s in SPLITS))
    for name in AREAS:
        print(f"{name:<12} " + " ".join(f"{sum(r[1] == name for r in data[s]):>10}" for s in SPLITS))
    print(f"{'modules':<12} " + " ".join(f"{len({r[2] for r in data[s]}):>10}" for s in SPLITS))
    print(f"wrote {', '.join(paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
