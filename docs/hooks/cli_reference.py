"""MkDocs hook: the CLI reference page (`reference/cli.md`), generated from the command-line parser on every build.

Each command's page section comes from `mlm_lightning.cli.main.build_parser(command)`, the parser the command
itself parses with, so the reference lists exactly the options, types, defaults and help that `mlm-lightning
COMMAND --help all` would: it cannot drift from the code. The page is a virtual file (nothing is written into
`docs/`), added in `on_files` so that the nav and the links to it are checked by `mkdocs build --strict`.
"""

from __future__ import annotations

import json
import os
import re
import sys

PAGE = "reference/cli.md"
# parser actions that are no option a user types (help, the per-group config loaders, subclass help)
SKIPPED_ACTIONS = ("_HelpAction", "_ActionConfigLoad", "_ActionHelpClassPath", "_ActionHelpClass")


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=cli_reference(os.path.dirname(config.config_file_path))))
    return files


def cli_reference(root: str) -> str:
    """The reference page's Markdown, for the package in the checkout at `root` (ahead of any installed copy)."""
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # (building the parsers must never reach for the network)
    from mlm_lightning.cli.main import COMMANDS, LIGHTNING_COMMANDS, build_parser

    names = [*LIGHTNING_COMMANDS, *COMMANDS]
    parsers = {name: build_parser(name) for name in names}
    lines = [
        "# CLI reference",
        "",
        "Every command of `mlm-lightning` with every option, generated from the command-line parser when this site",
        "is built. `mlm-lightning COMMAND --help` prints the same on the command line. Options take `--name value`;",
        "a bare boolean option means `true`. Defaults shown are the parser's: some follow what you ask (see",
        "[Defaults that follow what you ask](../index.md#defaults-that-follow-what-you-ask)), and `--print_config`",
        "shows the values a run will use.",
        "",
        "| command | what it does |",
        "| --- | --- |",
    ]
    for name in names:
        lines.append(f"| [`{name}`](#{name}) | {_cell(_summary(name, parsers[name], LIGHTNING_COMMANDS))} |")
    for name in names:
        lines += ["", f"## {name}", "", _text(_summary(name, parsers[name], LIGHTNING_COMMANDS)) + ".", ""]
        lines += _command_options(parsers[name])
    return "\n".join(lines) + "\n"


def _summary(name: str, parser, lightning_commands: dict) -> str:
    text = lightning_commands.get(name) or parser.description or ""
    return " ".join(text.split()).rstrip(".")


def _command_options(parser) -> list[str]:
    lines = []
    positionals = [a for a in parser._actions if not a.option_strings and _kept(a)]
    for action in positionals:
        lines.append(f"Positional: `{action.dest.upper()} ...`: {_text(_help(action))}")
        lines.append("")
    # the options of the command itself (LightningCLI puts `--ckpt_path` in a group of its own) first, in one table;
    # then one table per option group (`--trainer.*`, `--model.*`, ...)
    tables: dict[str, tuple[str, str, list]] = {}
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and _kept(a)]
        prefixes = {a.dest.split(".")[0] if "." in a.dest else "" for a in actions}
        key = prefixes.pop() if len(prefixes) == 1 else ""
        title, description = (f"`--{key}.*`", _help_text(group.description or "")) if key else ("Options", "")
        if actions:
            entry = tables.setdefault(key, (title, description, []))
            entry[2].extend(actions)
    for title, description, actions in sorted(tables.values(), key=lambda t: t[0] != "Options"):
        lines += [f"### {title}", ""]
        if description:
            lines += [_text(description), ""]
        lines += ["| option | type | default | help |", "| --- | --- | --- | --- |"]
        for action in actions:
            options = ", ".join(f"`{o}`" for o in action.option_strings if o.startswith("--"))
            lines.append(f"| {options} | {_cell(_type(action))} | {_cell(_default(action))} | {_cell(_help(action))} |")
        lines.append("")
    return lines


def _kept(action) -> bool:
    return type(action).__name__ not in SKIPPED_ACTIONS and action.help != "==SUPPRESS=="


def _type(action) -> str:
    hint = getattr(action, "_typehint", None) or action.type
    if hint is None:
        return ""
    text = hint.__name__ if isinstance(hint, type) else str(hint)
    return "`" + text.replace("typing.", "").replace("NoneType", "None") + "`"


def _default(action) -> str:
    value = action.default
    if getattr(action, "required", False):
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, str):
        return "" if value == "==SUPPRESS==" else f"`{value}`"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = str(value)
    return f"`{text if len(text) <= 60 else text[:57] + '...'}`"


def _help(action) -> str:
    return _help_text(action.help or "")


def _help_text(text: str) -> str:
    """Docstring text as one Markdown line: reST roles and literals as code, no stale "Default:" sentences (the
    default column has the parser's own)."""
    text = re.sub(r"`([^`<]+?)\s*<(https?://[^>]+)>`_", r"\1 (\2)", text)  # a reST link
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"``\1``", text)
    text = re.sub(r"Default:\s*``[^`]*``\.?", "", text)
    text = re.sub(r"Default:\s*[^\s.]+\.?", "", text)
    text = text.replace("``", "`")
    return " ".join(text.split())


def _text(text: str) -> str:
    """Markdown-safe text: outside code spans, `<`, `>`, `*` and `_` are shown as typed, not read as markup."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans
        parts = [text.replace("`", "'")]
    for i in range(0, len(parts), 2):
        parts[i] = (parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                    .replace("*", "\\*").replace("_", "\\_").replace("[", "\\["))
    return "`".join(parts)


def _cell(text: str) -> str:
    """Text for a table cell: markup-safe, and a `|` outside code never ends the cell (inside a code span,
    Python-Markdown's tables keep it, and an escape would show)."""
    parts = _text(text).split("`")
    return "`".join(p.replace("|", "\\|") if i % 2 == 0 else p for i, p in enumerate(parts))
