"""`python -m trainer effect`: the "did it learn?" check on demand for any adapter (render/effect.py). Settings the
command does not get come from the adapter's run folder (its config.json), when it lies in one.
"""
from __future__ import annotations

import argparse
import sys


def add_effect_command(sub) -> None:
    e = sub.add_parser("effect", help="render an adapter at strengths 0-1.5 and say whether it learned its dataset")
    e.add_argument("--lora", required=True, metavar="FILE", help="the adapter (.safetensors)")
    e.add_argument("--data", metavar="DIR", help="the training images (default: the run's data folder)")
    e.add_argument("--model", help="base model (default: the run's, else builtin)")
    e.add_argument("--trigger", help="trigger word (default: the run's)")
    e.add_argument("--resolution", type=int, help="render size in px (default: the run's, else the model's)")
    e.add_argument("--clip-model", metavar="PATH", help="local CLIP model folder: score with CLIP image similarity")
    e.add_argument("--out", metavar="DIR", help="where effect.json and effect.png go (default: the adapter's folder)")


def cmd_effect(args: argparse.Namespace) -> int:
    from .render import effect
    from .render.generate import Renderer

    cfg = effect.run_config(args.lora)
    data = args.data or cfg.get("data_dir") or ""
    text = {k: int(cfg[k]) for k in ("clip_skip", "max_token_length") if isinstance(cfg.get(k), int)}
    model = args.model or cfg.get("model") or "builtin"
    result = effect.check_adapter(lambda: Renderer.load(model), args.lora, data,
                                  trigger_word=args.trigger or cfg.get("trigger_word", ""), out_dir=args.out,
                                  resolution=args.resolution or int(cfg.get("resolution") or 0), text_encoding=text,
                                  clip_model=args.clip_model or cfg.get("clip_model") or None,
                                  caption_extension=cfg.get("caption_extension") or ".txt",
                                  log=lambda m: print(m, file=sys.stderr))
    print(result.advice, file=sys.stderr)
    if result.grid:
        print(f"grid: {result.grid}", file=sys.stderr)
    print(f"effect: {result.line()}")
    return 1 if result.verdict == "unknown" else 0
