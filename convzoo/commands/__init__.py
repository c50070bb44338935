"""The subcommands of the ``convzoo`` command, one module each.

Every public module of this package defines ``register(subparsers)``, which adds its parser
and sets ``func=run``; ``run(args) -> int`` returns the exit code. :func:`convzoo.cli.main`
discovers the modules with :mod:`pkgutil`, so a new command is a new file here.

Exit codes: 0 success, 1 runtime failure, 2 usage error or bad input. A command reports bad
input by raising :class:`UsageError` (or returning 2); the CLI prints the message.
"""


class UsageError(Exception):
    """Bad input the user can fix (missing path, unknown model, bad option): exit code 2."""
