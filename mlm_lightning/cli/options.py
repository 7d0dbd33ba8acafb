"""The options of a command, known before the heavy imports: the short `--help`, and a bad option refused at once.

Building LightningCLI's parser means importing torch and Lightning and reading every signature (seconds). What
`--help` and the option check need from it (the option names, which of them take nested keys, the short help
text) is kept in a small JSON file in the cache directory, named by a key over everything the parser is built
from: this package's source and the versions of the libraries that shape it. A different key means another
parser: the file is built again from the real parser, never trusted across versions. Without a cache file the
check runs on the real parser, inside the parse, with the same rule and message.

The check follows argparse's (and jsonargparse's) own order, so that an option the parser accepts is never
refused: an exact name, a key under an option with a type (a class's `init_args`, a dict), a unique abbreviation;
anything else the parser would call unrecognized or ambiguous, and so is it here, with the closest option named.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys

from mlm_lightning.errors import MLMError
from mlm_lightning.errors import check as check_that

# the Trainer options the short --help shows (`--help all` shows every one)
TRAINER_OPTIONS = ("max_steps", "max_epochs", "max_time", "accelerator", "devices", "num_nodes", "strategy",
                   "precision", "accumulate_grad_batches", "gradient_clip_val", "log_every_n_steps",
                   "val_check_interval", "default_root_dir", "logger", "callbacks")
# the libraries whose versions shape the parser (its options, types, defaults and help text)
PARSER_LIBRARIES = ("lightning", "jsonargparse", "torch", "docstring-parser", "typeshed-client")
ALL = "all"
HELP_WIDTH = 110


class UnknownOption(MLMError):
    """An option the command does not have (exit code 2, as the parser's own errors)."""


def help_all(argv: list[str]) -> tuple[bool, list[str]]:
    """Is `--help all` (or `--help=all`) asked for? Then the arguments with a plain `--help`, for the parser."""
    for i, arg in enumerate(argv):
        if arg == f"--help={ALL}" or (arg == "--help" and i + 1 < len(argv) and argv[i + 1] == ALL):
            return True, [*argv[:i], "--help"]
    return False, argv


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in (argv[: argv.index("--")] if "--" in argv else argv))


# LightningCLI's own optimizer and scheduler options (not added: `auto_configure_optimizers=False`): the module
# builds AdamW and its schedule from its own options, and Lightning's would be silently ignored or fail
FOREIGN_OPTIONS = {
    "optimizer": "the optimizer is AdamW, set by --model.learning_rate, --model.head_learning_rate,"
                 " --model.weight_decay, --model.betas and --model.eps",
    "lr_scheduler": "the schedule is set by --model.schedule (linear, cosine, wsd, constant), --model.warmup_steps,"
                    " --model.decay_share and --model.min_lr_ratio",
}


def refuse_optimizer_options(args) -> None:
    for arg in args:
        name = arg[2:].split("=", 1)[0].split(".", 1)[0] if isinstance(arg, str) and arg.startswith("--") else ""
        check_that(name not in FOREIGN_OPTIONS, f"{arg.split('=', 1)[0]} is not an option of mlm-lightning:"
                                                f" {FOREIGN_OPTIONS.get(name)} (see mlm-lightning fit --help)")


# -- the rule ----------------------------------------------------------------------------------------------------
def spec_of(parser) -> dict:
    """What the check needs from a parser: its option strings, and for each destination whether its action has a
    type (jsonargparse then takes keys below it, `--trainer.logger.init_args.save_dir`)."""
    return {"options": sorted(parser._option_string_actions),
            "typed": {a.dest: getattr(a, "_typehint", None) is not None or type(a).__name__ == "ActionFail"
                      for a in parser._actions}}


def check(argv: list[str], spec: dict, command: str) -> None:
    """Raise `UnknownOption` for the first option in `argv` that the parser would refuse as unrecognized or
    ambiguous; anything it might take (or that is not an option at all) is left to it."""
    options = spec["options"]
    for arg in argv:
        if arg == "--":
            return
        if not arg.startswith("--") or arg in options or " " in arg:
            continue  # (with a space argparse may take it as a positional value)
        name = arg.split("=", 1)[0]
        if name in options or _under_typed(name, spec["typed"]):
            continue
        matches = [o for o in options if o.startswith(name)]
        if len(matches) == 1:
            continue  # (argparse takes a unique abbreviation)
        raise UnknownOption(_line(name, matches, options, command))


def _under_typed(name: str, typed: dict) -> bool:
    """jsonargparse's rule for a dotted name that is no option: the nearest parent destination decides."""
    parts = name[2:].split(".")
    for n in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:n])
        if parent in typed:
            return typed[parent]
    return False


def _line(name: str, matches: list[str], options: list[str], command: str) -> str:
    names = sorted({o.rstrip("+") for o in options if o.startswith("--")})
    if matches:  # ambiguous: the closest of the options it abbreviates
        candidates = sorted({m.rstrip("+") for m in matches})
        best = difflib.get_close_matches(name, candidates, n=1, cutoff=0) or candidates
        return f"ambiguous option {name}: did you mean {best[0]}?"
    best = difflib.get_close_matches(name, names, n=1)
    if best:
        return f"unknown option {name}: did you mean {best[0]}?"
    return f"unknown option {name}; mlm-lightning {command} --help lists the options"


# -- the short help ------------------------------------------------------------------------------------------------
def short_help(parser, command: str, description: str | None = None) -> str:
    """The command's own options first, grouped (model, data, checkpoint, ...), then the Trainer options people
    use, and the way to all of them. (The parser is changed: build a fresh one for anything else.)"""
    import argparse
    import functools

    # a fixed width: the text is cached, whatever the terminal that asks for it
    parser.formatter_class = functools.partial(parser.formatter_class, width=HELP_WIDTH, max_help_position=32)
    if description:
        parser.description = description

    shown = {f"trainer.{name}" for name in TRAINER_OPTIONS}
    hidden = 0
    for action in parser._actions:
        if action.dest.startswith("trainer.") and action.dest not in shown or \
                action.dest.endswith(".help") and action.dest.startswith("trainer."):
            action.help = argparse.SUPPRESS
            hidden += 1
    groups = parser._action_groups
    trainer = [g for g in groups if any(a.dest.startswith("trainer.") for a in g._group_actions)]
    parser._action_groups = [g for g in groups if g not in trainer] + trainer
    for group in trainer:
        group.description = (f"The Trainer options people use most ({hidden} more: mlm-lightning {command}"
                             f" --help {ALL}).")
    parser.usage = f"mlm-lightning {command} [--config FILE] [--name value ...]"
    return parser.format_help() + (f"\n`mlm-lightning {command} --help {ALL}` lists every option, with all of"
                                   " Lightning's Trainer options.\n")


# -- the cache -------------------------------------------------------------------------------------------------------
def _key() -> str:
    from importlib import metadata

    digest = hashlib.sha256(sys.version.encode())
    for name in PARSER_LIBRARIES:
        try:
            digest.update(f"{name}={metadata.version(name)};".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name}=none;".encode())
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, package).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def _path(command: str, key: str) -> str:
    # the cache directory's rule is data/cache.py's default_cache_dir (not imported: it brings torch)
    root = os.environ.get("MLM_LIGHTNING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mlm-lightning")
    return os.path.join(root, "cli", f"{command}-{key}.json")


def load(command: str) -> dict | None:
    """The cached spec of a Lightning command (`options`, `typed`, `help`), or None. A file that is not what this
    module writes is ignored (and replaced at the next store)."""
    try:
        with open(_path(command, _key()), encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(spec, dict) and isinstance(spec.get("options"), list) and isinstance(spec.get("typed"), dict) \
        and all(isinstance(o, str) for o in spec["options"]) and isinstance(spec.get("help", ""), str)
    return spec if ok else None


def store(command: str, spec: dict) -> None:
    """Write the spec (whole or not at all); a cache that cannot be written costs speed only."""
    from mlm_lightning.files import atomic_file

    try:
        with atomic_file(_path(command, _key())) as f:
            json.dump(spec, f)
    except (OSError, MLMError):
        pass


def build(command: str, build_parser, description: str | None = None) -> dict:
    """The spec of a Lightning command from its real parser, `build_parser(command)` (slow: torch, Lightning),
    stored."""
    parser = build_parser(command)
    spec = spec_of(parser)
    spec["help"] = short_help(parser, command, description)  # (after spec_of: it hides options in the parser)
    store(command, spec)
    return spec
