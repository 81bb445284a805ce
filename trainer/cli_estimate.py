"""`python -m trainer estimate <train flags> [--json]`: a train command's peak memory and time, predicted from
the model's architecture on the meta device before anything is loaded (``loop.estimate``), with the settings
that would fit when it does not.
"""
from __future__ import annotations

import argparse
import json
from typing import Callable


def add_estimate_command(sub, add_train_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    e = sub.add_parser("estimate", help="predict a train command's peak memory and time (no weights loaded)")
    add_train_arguments(e)
    e.add_argument("--json", action="store_true", help="print one JSON object (peak_bytes, step_seconds, "
                   "total_seconds, assumptions, alternatives)")
    e.add_argument("--device", choices=("cpu", "cuda"), help="device to predict for (default: CUDA when present)")


def cmd_estimate(args: argparse.Namespace) -> int:
    from .cli import config_from_args
    from .loop.estimate import advice, estimate_with_alternatives
    from .loop.threads import configure_threads

    args.out = args.out or "outputs/estimate"     # nothing is written; train's parser wants a run folder
    config = config_from_args(args)
    config.check()
    configure_threads(config.cpu_threads, register=False)
    first, others = estimate_with_alternatives(config, device=args.device)
    if args.json:
        print(json.dumps({**first.to_json(), "alternatives": [e.to_json() for e in others]}, indent=2))
    else:
        print(advice(first, others))
        for line in first.assumptions:
            print(f"  assumes {line}")
    return 0
