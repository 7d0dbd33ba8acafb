"""The offline default corpus: text every CPython install carries, so `mlm-lightning fit` needs no download.

Two sources: the language reference (`pydoc_data.topics`, the text of `help("if")`) and the docstrings of the
standard library's own modules. The docstrings are read from the `.py` files under `sysconfig`'s stdlib
directory with `ast` (never imported: importing the standard library runs its code, and some modules open
windows or sockets). They are cleaned for prose: doctest lines (`>>>`, `...`), signature lines (`f(a, b) -> x`),
option and field tables and short lines go.

The corpus is split by source unit (a topic of the reference, a module of the library) with a fixed hash, so the
validation file holds whole modules the model never trains on. Both files are written once per CPython version
into the cache, aside and then renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import logging
import os
import re
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterator

from mlm_lightning.errors import MLMError
from mlm_lightning.files import publish, temp_beside

log = logging.getLogger("mlm_lightning")

VERSION = 3  # bump when the cleaning changes: the cached files are named by it
VAL_PERCENT = 5  # share of source units held out for validation
MIN_CHARS = 40  # shorter lines are mostly headings, names and fragments
# Under the stdlib: not prose (tests, the IDLE test suite, installed packages, compiled modules, build config)
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib-dynload", "__pycache__",
             "turtledemo", "encodings"}
SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")  # `sorted(iterable, /, *, key=None)`, `f(x) -> int`
DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)")
TABLE = re.compile(r"^\s*([-=+*]{3,}|[-\w.]+\s{2,}\S|:\w+|\||-\w)")  # rst rules, `name   meaning` rows, flags


def _paragraphs(text: str) -> Iterator[str]:
    """The prose paragraphs of one docstring (or reference topic), each joined onto one line."""
    for block in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        lines = block.splitlines()
        if any(DOCTEST.match(x) for x in lines):  # an example: its prose is about the code around it
            continue
        lines = [x for x in lines if not SIGNATURE.match(x.strip())]
        if not lines or any(TABLE.match(x) for x in lines) or lines[0].startswith((" ", "\t")):
            continue  # tables, option lists and indented code blocks
        para = " ".join(" ".join(lines).replace('"', "").split())  # pydoc quotes every keyword: "break"
        if len(para) >= MIN_CHARS and sum(c.isalpha() for c in para) > 0.6 * len(para):
            yield para


def reference_units() -> list[tuple[str, list[str]]]:
    """[(topic name, paragraphs)] of the language reference, in name order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise MLMError("this Python has no pydoc_data module (a stripped install), so there is no offline default"
                       " corpus; pass your own text with --data.train_files") from None
    return [(f"topic:{key}", list(_paragraphs(topics[key]))) for key in sorted(topics)]


def stdlib_dir() -> str | None:
    """The standard library's source directory, if this Python has its `.py` files."""
    path = sysconfig.get_paths().get("stdlib")
    return path if path and os.path.isfile(os.path.join(path, "os.py")) else None


def docstring_units(root: str | None = None) -> list[tuple[str, list[str]]]:
    """[(module path, paragraphs)] of the standard library's docstrings, in path order (empty: none found)."""
    root = root or stdlib_dir()
    if root is None:
        return []
    units = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(("config-", ".")))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(directory, name)
            try:
                with open(path, "rb") as f:
                    tree = ast.parse(f.read(), path)
            except (SyntaxError, ValueError, OSError):  # a file for another Python, or unreadable: skip it
                continue
            paras = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=False)
                    if doc:
                        paras.extend(_paragraphs(doc))
            if paras:
                units.append((os.path.relpath(path, root).replace(os.sep, "/"), paras))
    return units


def is_val_unit(name: str) -> bool:
    """A fixed hash of the unit's name: the same modules are held out on every machine and run."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 100 < VAL_PERCENT


def split_lines(units: list[tuple[str, list[str]]]) -> tuple[list[str], list[str]]:
    """(train lines, validation lines): whole units to one side, each line once (the first unit keeps it)."""
    seen: set[str] = set()
    train, val = [], []
    for name, paras in units:
        side = val if is_val_unit(name) else train
        for p in paras:
            if p not in seen:
                seen.add(p)
                side.append(p)
    return train, val


def _write_all(paths_texts: dict[str, str]) -> None:
    """Write every file aside, then rename each into place (a crash leaves no half-written corpus file)."""
    temps = {}
    try:
        for path, text in paths_texts.items():
            temps[path] = tmp = temp_beside(path)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        for path, tmp in temps.items():
            publish(tmp, path)  # (synced, with the umask's permissions)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def default_corpus_files(cache_dir: str) -> tuple[str, str]:
    """(train file, validation file) of the offline default, built on first use and cached per CPython version.

    With no standard-library sources (a stripped Python) it is the language reference alone, and says so.
    """
    version = "{}.{}.{}".format(*sys.version_info[:3])
    docs = stdlib_dir() is not None
    kind = "reference+docstrings" if docs else "reference"
    base = os.path.join(cache_dir, "corpus", f"python-{version}-{kind}-v{VERSION}")
    paths = (f"{base}.train.txt", f"{base}.val.txt")
    if not docs:
        log.warning("no standard-library sources in this Python (%s): the offline default corpus is the language"
                    " reference alone (a smaller corpus: the model will memorise more)", sysconfig.get_paths().get(
                        "stdlib"))
    if all(os.path.exists(p) for p in paths):
        return paths
    units = reference_units() + (docstring_units() if docs else [])
    train, val = split_lines(units)
    _write_all({paths[0]: "\n".join(train) + "\n", paths[1]: "\n".join(val) + "\n"})
    return paths


def default_corpus(cache_dir: str) -> str:
    """The offline default's training file; `default_corpus_files` gives its validation file too."""
    return default_corpus_files(cache_dir)[0]


def demo_sentences(cache_dir: str, n: int = 4, min_words: int = 8, max_words: int = 20) -> list[str]:
    """`n` held-out lines for the demo, picked by a rule rather than by hand: the first held-out lines of
    `min_words` to `max_words` words, each with its first word of 4+ letters that is among the training text's
    300 most frequent such words replaced by [MASK] (so the model saw the word, never the sentence)."""
    train, val = default_corpus_files(cache_dir)
    with open(train, encoding="utf-8") as f:
        counts = Counter(w for line in f for w in re.findall(r"[a-z]{4,}", line.lower()))
    common = {w for w, _ in counts.most_common(300)}
    out = []
    with open(val, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if not min_words <= len(words) <= max_words:
                continue
            i = next((i for i, w in enumerate(words) if w.lower() in common), None)
            if i is not None:
                out.append(" ".join(words[:i] + ["[MASK]"] + words[i + 1:]))
            if len(out) == n:
                break
    return out


if __name__ == "__main__":  # `python -m mlm_lightning.data.offline [N]`: the demo's sentences, one a line
    from mlm_lightning.data.cache import default_cache_dir

    print("\n".join(demo_sentences(default_cache_dir(), int(sys.argv[1]) if len(sys.argv) > 1 else 4)))
