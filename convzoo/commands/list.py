"""``convzoo list``: the registered models with their parameter counts and FLOPs."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ._tools import positive_int

_logger = logging.getLogger(__name__)

_DESCRIPTION = """\
List the registered models, optionally filtered by a shell-style PATTERN ('convnext*'),
with their parameter count and their multiply-accumulates (MACs; FLOPs = 2 x MACs) for
one image at --input-size. Models are built on PyTorch's meta device, so listing
even the largest ones is quick and allocates no memory."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "list", help="list the models with parameters and FLOPs",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  convzoo list\n  convzoo list 'replknet*' --input-size 384\n  convzoo list --names-only",
    )
    parser.add_argument("pattern", nargs="?", metavar="PATTERN", help="shell-style filter on the names, e.g. 'convnext*'")
    parser.add_argument("--input-size", type=positive_int, default=224, metavar="PX", help="image side for the FLOP count (default: 224)")
    parser.add_argument("--names-only", action="store_true", help="print only the names (no model is built)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def _describe(name: str, input_size: int, counter) -> dict:
    """The row of ``name``: built on the meta device inside ``counter`` (a
    :class:`~convzoo.analysis.MetaFlopCounter` shared by all rows, so that what one model
    computed speeds up the next), on the CPU when an init needs real tensors."""
    import torch

    from .. import create_model
    from ..analysis import count_flops, count_params
    from ..models._registry import get_entry_point

    row = {"name": name, "params": None, "macs": None}
    paper = getattr(get_entry_point(name), "paper_figures", None)  # published figures, where a family records them
    if paper:
        row["paper"] = paper
    try:
        with torch.device("meta"), counter:
            model = create_model(name)
    except Exception:  # noqa: BLE001 - an init that needs real tensors: build on the CPU instead
        _logger.debug("building %s on the meta device failed", name, exc_info=True)
        try:
            model = create_model(name)
        except Exception as err:  # noqa: BLE001 - a listing shows what it can
            _logger.warning("could not build %s: %s: %s", name, type(err).__name__, err)
            return row
    row["params"] = count_params(model)
    shape = (1, getattr(model, "in_chans", 3), input_size, input_size)
    try:
        on_meta = any(p.is_meta for p in model.parameters())
        row["macs"] = counter.count(model, shape) // 2 if on_meta else count_flops(model, shape).macs
    except Exception as err:  # noqa: BLE001 - a listing shows what it can
        _logger.warning("could not count the FLOPs of %s: %s", name, err)
    return row


def _human(count) -> str:
    if count is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def run(args) -> int:
    from .. import list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}" if args.pattern else "no models are registered", file=sys.stderr)
        return 1 if args.pattern else 0
    if args.names_only:
        print("\n".join(names))
        return 0
    from ..analysis import MetaFlopCounter

    counter = MetaFlopCounter()
    rows = [_describe(name, args.input_size, counter) for name in names]
    if args.json:
        print(json.dumps({"input_size": args.input_size, "models": rows}, indent=2))
        return 0
    width = max(len("model"), *(len(name) for name in names))
    with_paper = any("paper" in row for row in rows)
    paper_head = "  paper (GFLOPs as MACs, top-1)" if with_paper else ""
    print(f"{'model':<{width}}  {'params':>9}  {'MACs @' + str(args.input_size):>10}  {'FLOPs':>9}{paper_head}")
    for row in rows:
        flops = None if row["macs"] is None else 2 * row["macs"]
        paper = f"  {row.get('paper', '')}" if with_paper else ""
        print(f"{row['name']:<{width}}  {_human(row['params']):>9}  {_human(row['macs']):>10}  {_human(flops):>9}{paper}")
    return 0
