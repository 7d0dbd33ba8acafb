"""`mlm-lightning COMMAND`: LightningCLI's `fit|validate|test|predict` and the commands in `COMMANDS`.

Every command takes `--name value` options and `--help`. The Lightning ones are in `cli/lightning.py`; the
others are plain typed functions (options from the signature, help from the docstring, positional
arguments from a `*name` parameter) parsed with jsonargparse here. Any failure is one line and an exit code:
`_describe` is the one mapping from exceptions to lines and codes, for every command.

Imports of Lightning, torch and jsonargparse are inside functions on purpose: `mlm-lightning --help` and the
dispatch must not pay for them (seconds); a command imports what it needs once chosen. A Lightning command's
short `--help` and the check of its option names come from `cli/options.py`'s cache of its parser, so they need
neither; `build_parser` gives any command's full parser.
"""

from __future__ import annotations

import ast
import errno
import importlib
import importlib.util
import inspect
import logging
import os
import re
import signal
import sys
import traceback
import warnings

from mlm_lightning.arguments import use_cli_terms
from mlm_lightning.cli import options
from mlm_lightning.cli.rank import process_rank
from mlm_lightning.errors import Interrupted, MLMError, NonFiniteLossError, NothingToDo, check, os_error
from mlm_lightning.training import signals

log = logging.getLogger("mlm_lightning")
DEBUG_ENV = "MLM_LIGHTNING_DEBUG"


def _quiet_logging() -> None:
    """Our one-line progress notes on stderr; Lightning's banner lines and known-harmless warnings off."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mlm-lightning: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if process_rank() == 0 else logging.WARNING)
    log.propagate = False
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed",
                 "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*exists and is not empty.*",
                    ".*`isinstance\\(treespec, LeafSpec\\)`.*", ".*srun.*", ".*The number of training batches.*",
                    ".*args parameter is intended to run from within Python.*", ".*`tensorboardX` has been removed.*"):
        warnings.filterwarnings("ignore", pattern)


def _early_signal_handler(signum, frame):
    if not signals.running:  # during a fit, GracefulStop handles signals
        raise Interrupted(signum)


# Lightning's subcommands and their one-line help (theirs are the Trainer methods' first docstring lines)
LIGHTNING_COMMANDS = {
    "fit": "Train a BERT-family masked-language model on your text (no options: the offline demo)",
    "validate": "Validation loss, perplexity and accuracy of a checkpoint",
    "test": "The same as validate, reported as test metrics",
    "predict": "Fill masks in --data.predict_files with Lightning (several GPUs), JSONL in input order",
}
# The other commands: name -> "module:function" (a typed function; its docstring's first line is its help)
COMMANDS = {
    "fill-mask": "mlm_lightning.cli.commands:fill_mask",
    "score": "mlm_lightning.cli.commands:score",
    "export": "mlm_lightning.cli.commands:export",
    "plot": "mlm_lightning.cli.commands:plot",
    "serve": "mlm_lightning.serve.app:serve",
    "evaluate": "mlm_lightning.evaluate.run:evaluate",
}
BOOL_WORDS = {"true", "false", "yes", "no", "1", "0", "on", "off"}


def _load_command(name: str):
    module, function = COMMANDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise MLMError(f"the {name} command is not part of this installation ({module} is missing)") from None


def _one_line(name: str) -> str:
    """A command's help line: its function's docstring, read from the source without importing the module (the
    server's module would import FastAPI and uvicorn, a second of `--help` start-up)."""
    if name in LIGHTNING_COMMANDS:
        return LIGHTNING_COMMANDS[name]
    module, function = COMMANDS[name].split(":")
    try:
        origin = importlib.util.find_spec(module).origin
        with open(origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
        return (ast.get_docstring(node) or "").splitlines()[0].rstrip(".")
    except (AttributeError, ImportError, OSError, StopIteration, IndexError, SyntaxError):
        return "(not available in this installation)"


def print_help() -> None:
    names = list(LIGHTNING_COMMANDS) + list(COMMANDS)
    width = max(map(len, names))
    print("usage: mlm-lightning COMMAND [--name value ...]\n\nTrain and use BERT-family masked-language models on your"
          " own text.\n\ncommands:")
    for name in names:
        print(f"  {name.ljust(width)}  {_one_line(name)}")
    print("\n`mlm-lightning COMMAND --help` lists a command's options. `--debug` shows tracebacks.")


def build_parser(command: str):
    """The full jsonargparse parser of `command` (any of `mlm-lightning`'s, every option): what the command parses,
    what its `--help all` prints and what the CLI reference is generated from."""
    if command in LIGHTNING_COMMANDS:
        from mlm_lightning.cli.lightning import parser

        return parser(command)
    check(command in COMMANDS, f"unknown command {command!r}; the commands are"
                               f" {', '.join([*LIGHTNING_COMMANDS, *COMMANDS])}")
    from jsonargparse import ArgumentParser

    fn = _load_command(command)
    doc = inspect.getdoc(fn) or ""
    parser = ArgumentParser(prog=f"mlm-lightning {command}", description=doc.split("\n\n")[0], exit_on_error=False)
    parser.add_function_arguments(fn)
    star = _star(fn)
    if star:
        parser.add_argument(star, nargs="*", default=[], help=_param_help(doc, star))
    return parser


def _star(fn) -> str | None:
    """The name of `fn`'s `*name` parameter (the command's positional arguments), if it has one."""
    params = inspect.signature(fn).parameters.values()
    return next((p.name for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL), None)


def run_command(name: str, argv: list[str]):
    """Parse `argv` for the function registered as `name` and call it."""
    fn = _load_command(name)
    parser = build_parser(name)
    star = _star(fn)
    # a bare boolean option means true (`--json`), even before a positional argument (`--json "a [MASK]"`)
    flags = {f"--{p.name}" for p in inspect.signature(fn).parameters.values() if p.annotation in (bool, "bool")}
    argv = [x for i, a in enumerate(argv) for x in ([a, "true"] if a in flags and (
        i + 1 == len(argv) or argv[i + 1].lower() not in BOOL_WORDS) else [a])]
    options.check(argv, options.spec_of(parser), name)
    cfg = parser.parse_args(argv).as_dict()
    return fn(*cfg.pop(star, []), **cfg) if star else fn(**cfg)


def _param_help(doc: str, name: str) -> str:
    for line in doc.splitlines():
        if line.strip().startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return ""

# OpenMP's wait policy: set before torch (and its libgomp) is first imported, which reads it once. libgomp's
# waiting threads otherwise spin for a while at every parallel region's end; with torch's one intra-op thread per
# core and a core taken by another job, the thread sharing that core is preempted and the others spin waiting for
# it: a fit beside one busy process kept 0.06 of its lone rate (scripts/bench_threads.py measures each setting).
# Passive waiting keeps the thread count, so results do not depend on the machine's load. The user's own
# OMP_WAIT_POLICY wins.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def openmp_defaults() -> None:
    for key, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(key, value)


# -- standard streams: a closed one or a reader that went away never ends a command in a traceback ----------------
# the commands whose result is what they print (the others' results are files, named on stderr too)
PRINTS_ITS_RESULT = {"fill-mask", "score"}


class _GuardedStdout:
    """sys.stdout for a command: writes to the real one until the reader goes away (a broken pipe, `| head -1`),
    then to nothing: a fit whose progress is piped into `head` trains on and saves what it would have saved."""

    def __init__(self, real):
        self.real = real
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self.real.write(text)
            except (BrokenPipeError, ValueError):  # (ValueError: a stream closed under us)
                self._break()
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.real.flush()
            except (BrokenPipeError, ValueError):
                self._break()

    def _break(self) -> None:
        self.broken = True
        # what the interpreter flushes at exit goes to /dev/null, not to a pipe that raises again
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self.real.fileno())
        except (OSError, ValueError):
            pass
        finally:
            os.close(null)

    def isatty(self) -> bool:
        return not self.broken and self.real.isatty()

    def __getattr__(self, name):
        return getattr(self.real, name)


def _closed_fds() -> list[int]:
    """Standard descriptors 0-2 that are closed, each reopened on /dev/null: else the next file opened (a
    checkpoint, a shard) would take its number, and a library's write to "stdout" would land in it."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    for fd in closed:
        null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
    return closed


def _guard_streams(command: str | None):
    """Standard streams that are closed or go away become /dev/null: stdin closed reads as empty input, stdout
    closed or a broken pipe discards the printed lines, and a command whose result is what it prints is refused
    at once when stdout is closed. Returns the streams to restore."""
    saved = (sys.stdin, sys.stdout, sys.stderr)
    closed = _closed_fds()
    if sys.stdin is None or 0 in closed:
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - the process's stdin, left open
    if sys.stderr is None or 2 in closed:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    stdout_closed = sys.stdout is None or 1 in closed
    if stdout_closed:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    if not isinstance(sys.stdout, _GuardedStdout):
        sys.stdout = _GuardedStdout(sys.stdout)
    if stdout_closed and command in PRINTS_ITS_RESULT:
        raise MLMError(f"standard output is closed: {command}'s results would be lost; give them a place (e.g."
                       " > results.txt)")
    return saved


def main(argv: list[str] | None = None) -> None:
    openmp_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    saved = (sys.stdin, sys.stdout, sys.stderr)
    use_cli_terms(True)
    previous = {s: signal.signal(s, _early_signal_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        saved = _guard_streams(argv[0] if argv else None)
        _quiet_logging()
        if not argv or argv[0] in ("-h", "--help"):
            return print_help()
        if argv[0] in LIGHTNING_COMMANDS:  # the short help and the option check, before torch and Lightning
            full, argv = options.help_all(argv)
            spec = None if full else options.load(argv[0])
            if not full and options.wants_help(argv[1:]):
                if spec is None or "help" not in spec:
                    spec = options.build(argv[0], build_parser, LIGHTNING_COMMANDS[argv[0]])
                return print(spec["help"], end="")
            if spec is not None:
                options.refuse_optimizer_options(argv[1:])  # (LightningCLI's own: named, with ours instead)
                options.check(argv[1:], spec, argv[0])
        from mlm_lightning.hub import quiet_transformers  # (transformers: ~0.7 s, not for the help above)

        quiet_transformers()
        if argv[0] in COMMANDS:
            return run_command(argv[0], argv[1:])
        check(argv[0].startswith("-") or argv[0] in LIGHTNING_COMMANDS,
              f"unknown command {argv[0]!r}; the commands are {', '.join([*LIGHTNING_COMMANDS, *COMMANDS])}"
              " (mlm-lightning --help)")
        from mlm_lightning.cli.lightning import run_lightning_cli

        run_lightning_cli(argv)
    except BaseException as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        if type(e) is SystemExit:  # --help, serve's 130/143: exit as is, without _describe's slow Lightning import
            raise
        code, message = _describe(e, argv[0] if argv and not argv[0].startswith("-") else "fit")
        if code is None or debug:
            raise
        if process_rank() == 0:  # once, not once per DDP process
            print(f"mlm-lightning: {message}", file=sys.stderr)
        _leave_process_group(code)
        sys.exit(code)
    finally:
        use_cli_terms(False)
        if isinstance(sys.stdout, _GuardedStdout):
            sys.stdout.flush()
        sys.stdin, sys.stdout, sys.stderr = saved
        for s, handler in previous.items():
            signal.signal(s, handler)


def _leave_process_group(code: int) -> None:
    """A failed process of a multi-process run exits with `os._exit`, skipping the interpreter's teardown: there,
    DDP's reducer drops the gloo process group with the GIL held, whose destructor joins its worker thread, which
    may itself wait for the GIL to free a finished collective's tensor: a deadlock (`~ProcessGroupGloo` in
    `std::thread::join`, its worker in `gil_scoped_acquire`), and the process never ends. Lightning has torn the
    run down (checkpoints written, loggers closed) before the error gets here, so nothing is lost. A single
    process, or one without a process group, returns and exits normally."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _loaded(module: str, name: str):
    """A class of `module` if it is imported, else `()` (isinstance of nothing): an exception of a class whose
    module was never imported cannot exist, and an error met before the heavy imports is told without them."""
    return getattr(sys.modules.get(module), name, ())


def _describe(e: BaseException, command: str = "fit") -> tuple[int | None, str]:
    """Map an exception to (exit code, one-line message); (None, _) re-raises it."""
    ArgumentError = _loaded("jsonargparse", "ArgumentError")  # noqa: N806 - classes
    MisconfigurationException = _loaded("lightning.fabric.utilities.exceptions", "MisconfigurationException")  # noqa: N806
    SIGTERMException = _loaded("lightning.pytorch.utilities.exceptions", "SIGTERMException")  # noqa: N806

    if isinstance(e, SystemExit) and not isinstance(e, SIGTERMException):
        return None, ""
    if isinstance(e, (SIGTERMException, Interrupted, KeyboardInterrupt)):
        signum = getattr(e, "signum", None) or signals.last_signum or signal.SIGINT
        name = signal.Signals(signum).name
        saved = getattr(e, "last_checkpoint", None)
        if saved:
            return 128 + signum, f"interrupted by {name}; saved {saved}; resume: the same command plus --ckpt_path last"
        return 128 + signum, f"interrupted by {name}; no training step to save, nothing left half-written"
    if isinstance(e, NonFiniteLossError):
        saved = getattr(e, "last_checkpoint", None)
        kept = f"last good checkpoint kept: {saved}" if saved else "no checkpoint had been written yet"
        return e.exit_code, f"error: {e} ({kept})"
    if isinstance(e, NothingToDo):
        return 0, str(e)
    if isinstance(e, MLMError):
        return e.exit_code, f"error: {e}"
    if isinstance(e, ArgumentError):
        text = " ".join(str(e).split())
        huge = re.search(r'key "([^"]+)": Exceeds the limit .*?value has (\d+) digits', text)
        if huge:  # (Python's own advice, sys.set_int_max_str_digits, is no way on for a user)
            return 2, (f"error: --{huge.group(1)}: a number of {huge.group(2)} digits is far too large; give a"
                       f" sensible value; see mlm-lightning {command} --help")
        return 2, f"error: {text[:400]}; see mlm-lightning {command} --help"
    if isinstance(e, ValueError) and e.__traceback__ is not None:
        where = traceback.extract_tb(e.__traceback__)[-1].filename
        if f"{os.sep}lightning{os.sep}" in where:  # Lightning's own check of a trainer option
            return 2, f"error: {' '.join(str(e).split())}"
    if isinstance(e, MisconfigurationException):
        return 2, f"error: {str(e).splitlines()[0]}"
    error = os_error(e)
    if error is not None:
        return 2, f"error: {_os_line(error, e, command)}"
    return None, ""


# what an operating-system error means for a user, and the way on; where a command writes (to write elsewhere)
_OS_PROBLEMS = {
    errno.ENOSPC: ("no space left on the device", "free some space there, or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free some space there, or write elsewhere"),
    errno.EROFS: ("read-only file system", "write to a writable location"),
    errno.EACCES: ("permission denied", "give this user access to it, or use another location"),
    errno.EPERM: ("operation not permitted", "give this user access to it, or use another location"),
    errno.ENOTDIR: ("a part of this path is a file, not a directory", "use another path"),
    errno.EEXIST: ("exists already", "use another path"),
    errno.EISDIR: ("is a directory where a file is needed", "use another path"),
    errno.ENOENT: ("does not exist", "check the path"),
    errno.EMFILE: ("too many open files (this process)", "raise the limit (ulimit -n) or use fewer workers"),
    errno.ENFILE: ("too many open files (this system)", "raise the limit (ulimit -n) or use fewer workers"),
    errno.EIO: ("input/output error", "check the disk or network file system"),
}
_WRITES = {
    "fit": "--trainer.default_root_dir, --data.cache_dir (or $MLM_LIGHTNING_CACHE), --export_dir",
    "validate": "--trainer.default_root_dir, --data.cache_dir", "test": "--trainer.default_root_dir, --data.cache_dir",
    "predict": "--prediction_writer.output, --trainer.default_root_dir, --data.cache_dir",
    "export": "--export_dir", "plot": "--out",
}
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}


def _os_line(error: OSError, raised: BaseException, command: str) -> str:
    """One line for an operating-system error, in any command and phase: the path, the problem, the way on."""
    problem, fix = _OS_PROBLEMS.get(error.errno, (error.strerror or os.strerror(error.errno), "check it"))
    path = error.filename if isinstance(error.filename, str) else _open_file_in(raised)
    if error.errno == errno.EEXIST and path and os.path.isfile(path):
        problem = "is a file where a directory is needed"
    if path and os.path.basename(path).startswith((".", "tmp")) and not os.path.exists(path):
        path = os.path.dirname(os.path.abspath(path))  # (a temporary file, removed by now: its directory)
    where = f" ({_WRITES[command]})" if command in _WRITES and error.errno in _WRITE_ERRORS else ""
    saved = getattr(raised, "last_checkpoint", None)
    kept = f"; the last checkpoint is kept: {saved}" if saved else ""
    return f"{path!r}: {problem}; {fix}{where}{kept}" if path else f"{problem}; {fix}{where}{kept}"


def _open_file_in(e: BaseException) -> str | None:
    """The file a failed write() or close() was for (the OS names none): in the traceback's frames, innermost
    first, an open file object with a name, else a local absolute path in an existing directory."""
    import io

    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        values = list(frame.f_locals.values())
        for value in values:
            if isinstance(value, io.IOBase):
                name = getattr(value, "path", None) or getattr(value, "name", None)  # (fsspec's, Python's)
                if isinstance(name, str) and name:
                    return name
        for value in values:
            text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
            if isinstance(text, str) and os.path.isabs(text) and os.path.isdir(os.path.dirname(text)):
                return text
    return None
