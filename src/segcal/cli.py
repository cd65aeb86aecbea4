"""The ``segcal`` command. Thin: parses arguments and calls the library; no library module imports it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

COMMANDS = {
    "train": "fine-tune a segmentation model with a (calibration) loss",
    "predict": "run a model over a dataset split or image folder and store logits",
    "fit": "fit a post-hoc calibrator on a logits store",
    "evaluate": "calibration metrics of a logits store (optionally through a calibrator)",
    "detect": "write per-pixel error / OOD score maps for a folder of images",
    "evaluate-detection": "error (IDM) and OOD detection metrics of detectors on a logits store",
    "benchmark": "reproduce the comparison tables on real data",
    "report": "render a results folder as a self-contained HTML report",
    "demo": "the quick end-to-end job (README's first command)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segcal", description="Trustworthy confidence for semantic segmentation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _ADD_ARGS.get(name, lambda _p: None)(p)
    return parser


_ADD_ARGS: dict = {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handler = _HANDLERS.get(args.command)
    if handler is None:
        print(f"segcal {args.command}: not implemented yet", file=sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"segcal {args.command}: error: {err}", file=sys.stderr)
        return 1


_HANDLERS: dict = {}
