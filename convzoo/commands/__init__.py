"""The subcommands of the ``convzoo`` command, one module each.

Every public module of this package defines ``register(subparsers)``, which adds its parser
and sets ``func=run``; ``run(args) -> int`` returns the exit code. :func:`convzoo.cli.main`
discovers the modules with :mod:`pkgutil`, so a new command is a new file here.

Exit codes: 0 success, 1 runtime failure, 2 usage error or bad input. A command reports bad
input by raising :class:`UsageError` (or returning 2); the CLI prints the message.
"""


class UsageError(Exception):
    """Bad input the user can fix (missing path, unknown model, bad option): exit code 2."""


def parse_model_args(items) -> dict:
    """``["kernel_sizes=(3,3,3,3)", "small_kernel=None"]`` -> a dict of Python literals.

    A value that is not a Python literal is kept as a string (``norm=layer`` -> ``"layer"``).
    """
    import ast

    options = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"expected KEY=VALUE (VALUE a Python literal), got {item!r}")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return options


def check_model_name(name: str) -> None:
    """A :class:`UsageError` with the close names when ``name`` is not a registered model."""
    from ..models._registry import get_entry_point

    try:
        get_entry_point(name)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None


def create_model_or_exit(name: str, pretrained=None, **kwargs):
    """``convzoo.create_model`` with the user's mistakes turned into :class:`UsageError`."""
    import os

    from .. import create_model

    check_model_name(name)
    if pretrained is not None and not os.path.isfile(pretrained):
        raise UsageError(f"checkpoint file not found: {pretrained}")
    try:
        return create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError) as err:  # an option the config lacks, a checkpoint that does not fit
        raise UsageError(str(err)) from None
