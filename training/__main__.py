"""``brainage-train CONFIG`` / ``python -m training CONFIG``: train, cross-validate, export."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (pure: builds, never parses)."""
    parser = argparse.ArgumentParser(
        prog="brainage-train",
        description="Train a brain-age model family with k-fold cross-validation on BIDS data "
                    "preprocessed by `brainage ... participant`, then write weights and a model "
                    "card. Multi-GPU/CPU: torchrun --nproc_per_node N -m training CONFIG.")
    parser.add_argument("config", type=Path, help="training config (.toml, .yml or .yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue interrupted folds from their latest checkpoint")
    parser.add_argument("--fold", type=int, action="append", dest="folds", metavar="K",
                        help="train only fold K (repeatable); export waits for all folds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.max_epochs=10")
    parser.add_argument("--no-export", action="store_true", help="do not write weights and card")
    parser.add_argument("--log-file", type=Path, help="also log to this file")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0, or the code of the typed error)."""
    from bidsapp.errors import (BrainageError, ImageError, InputMissingError, ModelError,
                                NotWritableError, UsageError)

    from .config import load_config
    from .run import run_training

    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if args.log_file:
        args.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(args.log_file))
    logging.basicConfig(level=level, handlers=handlers,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    codes = {UsageError: 64, InputMissingError: 66, NotWritableError: 73, ImageError: 65,
             ModelError: 65}
    try:
        config = load_config(args.config, args.set)
        result = run_training(config, folds=args.folds, resume=args.resume,
                              export=not args.no_export)
    except BrainageError as exc:
        logging.getLogger("brainage.training").error("%s", exc)
        return next((code for cls, code in codes.items() if isinstance(exc, cls)), 1)
    if result.get("card"):
        logging.getLogger("brainage.training").info("model card: %s", result["card"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
