"""The documentation: a short README whose links resolve, a docs site that builds strictly (a broken link or anchor
fails it) with a CLI reference generated from the parser, and user docs written in the present tense."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 260
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# words that tell a document's history instead of what the tool does
HISTORY = re.compile(r"\b(before this|the old (default|recipe|behaviou?r|corpus)|the previous default|so far|as before|"
                     r"no longer|used to be|issue #?\d+)\b|(?<![\w/&])#\d+\b", re.IGNORECASE)


def _prose(path: Path) -> str:
    """A Markdown file without its fenced code blocks (program output quotes text that is not ours)."""
    return re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


def _anchors(path: Path) -> set[str]:
    """The heading ids Python-Markdown's toc gives a page (its `slugify`: word characters, spaces to hyphens)."""
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = re.sub(r"`", "", line.lstrip("#").strip())
            slug = re.sub(r"[^\w\s-]", "", text).strip().lower()
            out.add(re.sub(r"[-\s]+", "-", slug))
    return out


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines; move details to docs/"


def test_the_readmes_relative_links_resolve():
    broken = []
    links = LINK.findall(_prose(ROOT / "README.md"))
    assert any(link.startswith("docs/") for link in links)  # (the pattern really finds the links)
    for link in links:
        if re.match(r"[a-z]+:", link) or link.startswith("#"):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(link)
    assert not broken, f"README.md links to what does not exist: {broken}"


def test_the_docs_tell_no_history():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p in pages for m in HISTORY.finditer(_prose(p))]
    assert not found, f"user docs are in the present tense, without history: {found}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs and mkdocs-material are not installed (pip install -e '.[docs]')")
@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_the_docs_site_builds_strictly_with_a_generated_cli_reference(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    reference = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    from mlm_lightning.cli.main import COMMANDS, LIGHTNING_COMMANDS

    for name in [*LIGHTNING_COMMANDS, *COMMANDS]:
        assert f'id="{name}"' in reference, f"the CLI reference has no section for {name}"
    # options of each kind of command, with their defaults, as the parser has them
    for option in ("--data.train_files", "--model.learning_rate", "--trainer.max_steps", "--ckpt_path",
                   "--checkpoint.every_n_train_steps", "--max_top_k", "--top_k", "--export_dir", "--out"):
        assert f"<code>{option}</code>" in reference, f"the CLI reference lacks {option}"
    assert "127.0.0.1" in reference  # serve --host's default
