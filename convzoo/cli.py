"""The ``convzoo`` command line: ``convzoo <command> [options]``.

Subcommands live in :mod:`convzoo.commands`, one module each, discovered at start-up. The
commands print their results to stdout; everything else logs through :mod:`logging`, which is
routed to stderr here. A command's own progress reports (INFO records of its
``convzoo.commands.<name>`` logger) are shown at the default verbosity, as plain lines.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import pkgutil
import sys
import traceback
from typing import List, Optional, Sequence

from . import __version__, commands
from .commands import UsageError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

_DESCRIPTION = """\
convzoo: modern CNN kernels and the models built on them.

Train and evaluate image classifiers (on an image folder or on the built-in data set),
re-parameterize and export them, measure their speed and receptive fields.
Run `convzoo <command> --help` for the options of a command."""


def _command_modules() -> List[str]:
    return sorted(info.name for info in pkgutil.iter_modules(commands.__path__) if not info.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per module of :mod:`convzoo.commands`."""
    parser = argparse.ArgumentParser(
        prog="convzoo", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"convzoo {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name in _command_modules():
        module = importlib.import_module(f"{commands.__name__}.{name}")
        module.register(subparsers)
    return parser


class _Formatter(logging.Formatter):
    """``LEVEL logger: message``, except a command's progress reports, which are the bare message."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.startswith(commands.__name__ + "."):
            return record.getMessage()
        return super().format(record)


@contextlib.contextmanager
def _logging_to_stderr(verbosity: int):
    """Route convzoo's log records (and warnings) to stderr while a command runs."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("convzoo")
    command_logger = logging.getLogger(commands.__name__)
    saved = (root.level, root.propagate, command_logger.level)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    command_logger.setLevel(min(level, logging.INFO))
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.level, root.propagate, command_logger.level = saved


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind stdout (captured in tests)
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``convzoo`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or an argparse usage error
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        with _logging_to_stderr(args.verbose):
            return int(args.func(args) or 0)
    except UsageError as err:
        print(f"convzoo {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"convzoo {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`convzoo list | head`): not an error
        _silence_stdout()
        return EXIT_OK
    except Exception as err:  # noqa: BLE001 - the CLI turns any failure into a message + exit code
        if args.verbose >= 2:
            traceback.print_exc(file=sys.stderr)
        hint = "" if args.verbose >= 2 else " (run with -vv for the traceback)"
        print(f"convzoo {args.command}: failed: {type(err).__name__}: {err}{hint}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
