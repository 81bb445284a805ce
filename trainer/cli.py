"""Command line: `python -m trainer train|generate|report|presets`, the adapter file tools
`inspect|blend|resize|bake|convert` (``cli_files``) and the effect check `effect` (``cli_effect``).

Builds a TrainConfig (defaults -> preset -> flags), runs the same core the web UI uses, and
prints errors as one readable line (no traceback). `train` prints the adapter path last.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from .cli_effect import add_effect_command, cmd_effect
from .cli_estimate import add_estimate_command, cmd_estimate
from .cli_files import FILE_COMMANDS, add_file_commands
from .cli_caption import CAPTION_COMMANDS, add_caption_command
from .config import MIXED_PRECISIONS
from .errors import ConfigError, TrainerError

# flag -> TrainConfig field, for the flags the README documents
TRAIN_FLAGS = {
    "data": "data_dir", "out": "output_dir", "model": "model", "steps": "max_train_steps", "rank": "rank",
    "alpha": "alpha", "resolution": "resolution", "seed": "seed", "name": "name", "trigger": "trigger_word",
    "epochs": "epochs", "lr": "learning_rate", "batch_size": "batch_size",
    "mixed_precision": "mixed_precision", "text_encoder_lr": "text_encoder_lr",
    "projector_rank": "projector_rank", "projector_alpha": "projector_alpha", "projector_lr": "projector_lr",
    "cache_dir": "cache_dir", "conv_rank": "conv_rank", "conv_alpha": "conv_alpha", "network": "network",
    "checkpoint_every": "checkpoint_every_n_steps", "keep_checkpoints": "keep_checkpoints", "threads": "cpu_threads",
    "clip_model": "clip_model",
}
# switch flag -> (TrainConfig field, value it sets); an absent switch leaves the preset/config value
TRAIN_SWITCHES = {"train_text_encoder": ("train_text_encoder", True), "train_projectors": ("train_projector", True),
                  "no_unet": ("train_unet", False), "portable": ("export_portable", True),
                  "no_buckets": ("enable_buckets", False), "no_cache": ("cache_latents", False),
                  "compile": ("torch_compile", True), "gradient_checkpointing": ("gradient_checkpointing", True),
                  "no_effect_check": ("effect_check", False)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train and use LoRA adapters "
                                     "for Stable Diffusion (SD1.x, SD2.x, SDXL).")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a LoRA on a folder of images with .txt captions")
    add_train_arguments(t)
    add_estimate_command(sub, add_train_arguments)

    g = sub.add_parser("generate", help="render an image with zero or more LoRAs")
    g.add_argument("--prompt", required=True)
    g.add_argument("--model", default="builtin")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=7.0)
    g.add_argument("--negative", default="")
    g.add_argument("--size", type=int, help="image size in pixels (default: the model's native size)")
    g.add_argument("--clip-skip", type=int, default=0, metavar="N",
                   help="condition on the text encoder's layer N from the end, as the LoRA was trained "
                        "(A1111's clip skip; 0/1 = last layer; SD1/SD2 only)")
    g.add_argument("--max-token-length", type=int, default=75, choices=(75, 150, 225),
                   help="prompt tokens the text encoder sees; 150/225 encode longer prompts in chunks of 75")
    g.add_argument("--out", required=True, help="PNG file to write")

    r = sub.add_parser("report", help="check a dataset folder before training")
    r.add_argument("--data", required=True)
    r.add_argument("--trigger", default="")
    r.add_argument("--resolution", type=int, default=0,
                   help="warn about images smaller than this (default 0: no size check)")
    r.add_argument("--no-buckets", action="store_true",
                   help="do not show the aspect-ratio buckets (shown for --resolution, default 512)")
    r.add_argument("--caption-extension", default=".txt", metavar="EXT",
                   help="extension of the caption files beside the images (default .txt), e.g. .caption")

    sub.add_parser("presets", help="list the presets")
    add_file_commands(sub)
    add_caption_command(sub)
    add_effect_command(sub)
    return parser


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    """The flags of `train` (and of `estimate`, which predicts a train command's memory and time)."""
    t.add_argument("--data", help="folder of images with same-stem .txt captions (required unless --resume)")
    t.add_argument("--out", help="run folder: adapter, config.json, samples, checkpoints (required unless --resume)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its newest complete checkpoint (its config.json is the base)")
    t.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="training-state checkpoint every N steps (default 250; quick preset 100)")
    t.add_argument("--keep-checkpoints", type=int, metavar="K", help="newest checkpoints kept (default 2)")
    t.add_argument("--model", help="'builtin' (default), a diffusers folder, a .safetensors/.ckpt, or a hub id")
    t.add_argument("--preset", help="preset name (see `presets`) or a preset file")
    t.add_argument("--config", help="a saved config.json to start from (e.g. from an earlier run)")
    t.add_argument("--steps", type=int, help="optimizer steps (default: from epochs)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--rank", type=int, help="LoRA rank r")
    t.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / rank")
    t.add_argument("--network", choices=["lora", "dora", "loha", "lokr"], help="network type for every group: lora, "
                   "dora (+ magnitude), loha (Hadamard), lokr (Kronecker); diffusers loads lora/dora only")
    t.add_argument("--lr", type=float, help="UNet learning rate")
    t.add_argument("--text-encoder-lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--resolution", type=int, help="training size in pixels (multiple of 8)")
    t.add_argument("--mixed-precision", choices=MIXED_PRECISIONS,
                   help="auto (default): bf16 where it is faster, else fp32; see docs/BENCHMARKS.md")
    t.add_argument("--seed", type=int)
    t.add_argument("--name", help="file name of the adapter (without .safetensors)")
    t.add_argument("--trigger", help="trigger word prepended to every caption")
    t.add_argument("--train-text-encoder", action="store_true", default=None,
                   help="also train LoRA on the text encoder(s)")
    t.add_argument("--train-projectors", "--train-projector", action="store_true", default=None,
                   help="also train LoRA on the projector layers the model has (encoder_hid_proj, add_embedding, "
                        "text_projection); tools that don't know these modules skip them")
    t.add_argument("--no-unet", action="store_true", default=None,
                   help="do not train the UNet cross-attention (e.g. projectors only)")
    t.add_argument("--projector-rank", type=int, help="projector LoRA rank (default: --rank)")
    t.add_argument("--projector-alpha", type=float, help="projector LoRA alpha (default: --alpha)")
    t.add_argument("--projector-lr", type=float, help="projector learning rate")
    t.add_argument("--unet-targets", metavar="SETS",
                   help="UNet layers: cross-attn (default), attn (self + cross), ff, all (attn, ff, proj_in/out); "
                        "comma-combinable, e.g. cross-attn,ff")
    t.add_argument("--conv-rank", type=int, metavar="R", help="LoCon: also train the UNet's convs with rank R")
    t.add_argument("--conv-alpha", type=float, metavar="A", help="alpha of the conv group (default: conv rank)")
    t.add_argument("--text-encoder-targets", metavar="SET", help="text-encoder layers: attn (default) or all "
                   "(attention and MLP); with --train-text-encoder")
    t.add_argument("--no-buckets", action="store_true", default=None,
                   help="square-crop every image to the resolution instead of aspect-ratio buckets")
    t.add_argument("--cache-dir", metavar="DIR",
                   help="latent cache folder, shared by runs on the same images (default: <out>/cache)")
    t.add_argument("--no-cache", action="store_true", default=None,
                   help="encode every image through the VAE at every step (no latent cache)")
    t.add_argument("--portable", action="store_true", default=None,
                   help="also write NAME-portable.safetensors without projector modules")
    t.add_argument("--no-effect-check", action="store_true", default=None,
                   help="skip the effect check after training (renders at strengths 0-1.5; effect.json/png)")
    t.add_argument("--clip-model", metavar="PATH", help="local CLIP model folder: the effect check scores with "
                   "CLIP image similarity instead of colours and edges")
    t.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other TrainConfig field, e.g. --set noise_offset=0.05 (repeatable)")
    t.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the UNet (GPU: faster steps after compiling)")
    t.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass (much less memory, ~30%% slower)")
    t.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: the physical cores, shared with other running jobs)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    from .config import TEXT_ENCODER_TARGET_SETS, UNET_TARGET_SETS, TrainConfig, from_dict, resolve
    import json

    base = None
    if args.resume and not args.config:
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise TrainerError(f"--resume {args.resume}: no config.json there; give the run folder of an earlier "
                               "run (the --out it was trained with).", field="resume")
        args.config = str(saved)
        args.out = args.out or args.resume
    if not args.data and not args.config or not args.out:
        raise TrainerError("train needs --data DIR and --out DIR (or --resume RUN_DIR).", field="data_dir")
    if args.config:
        try:
            base = from_dict(json.loads(Path(args.config).read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise TrainerError(f"Config file '{args.config}' cannot be read ({err}); give a config.json "
                               "written by an earlier run.", field="config") from None
    overrides = {field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items()}
    for flag, (field, value) in TRAIN_SWITCHES.items():
        if getattr(args, flag):
            overrides[field] = value
    if args.unet_targets:
        overrides["unet_targets"] = _target_set(args.unet_targets, UNET_TARGET_SETS, "unet_targets")
    if args.text_encoder_targets:
        overrides["text_encoder_targets"] = _target_set(args.text_encoder_targets, TEXT_ENCODER_TARGET_SETS,
                                                        "text_encoder_targets")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainerError(f"--set {item!r} must look like FIELD=VALUE, e.g. --set noise_offset=0.05.",
                               field="set")
        overrides[key.strip()] = value.strip()
    return resolve(args.preset, overrides, base=base or TrainConfig())


def _target_set(text: str, sets: dict[str, tuple[str, ...]], field: str) -> list[str]:
    """'cross-attn,ff' -> the module suffixes of those named sets, in order, without repeats."""
    out: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name not in sets:
            raise TrainerError(f"--{field.replace('_', '-')} {name!r} is not one of {', '.join(sets)}; combine "
                               "them with commas (or give module names with --set).", field=field)
        out += [m for m in sets[name] if m not in out]
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .console import ConsoleProgress
    from .events import Control, Effect, Finished
    from .loop import distributed
    from .loop.records import FileControl
    from .loop.train import train

    config = config_from_args(args)
    main = distributed.is_main()     # under torchrun / accelerate launch only rank 0 talks and writes
    control = FileControl(config.output_dir) if main else Control()
    caught: list[int] = []

    def on_signal(signum, frame):  # Ctrl-C / SIGTERM: checkpoint and save; a second Ctrl-C aborts
        if control.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        caught.append(signum)
        print(f"\n{signal.Signals(signum).name}: stopping after this step, writing a checkpoint and the adapter",
              file=sys.stderr)
        control.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    finished: list[Finished | Effect] = []
    try:
        with ConsoleProgress(quiet=args.quiet or not main, silent=not main) as progress:
            path = train(config, listeners=[progress, lambda e: finished.append(e) if isinstance(e, (Finished, Effect))
                                            else None], control=control, resume=args.resume)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not main:
        return 128 + caught[0] if caught else 0
    for event in finished:
        if isinstance(event, Effect):
            print(f"effect: {event.line}", flush=True)
    finished = [e for e in finished if isinstance(e, Finished)]
    if caught and finished and finished[-1].stopped_early:
        print(f"interrupted at step {finished[-1].steps}; continue with: python -m trainer train --resume "
              f"{config.output_dir}", file=sys.stderr)
        print(path)
        return 128 + caught[0]
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .render.generate import RenderSettings, Renderer, parse_lora_arg

    loras = dict(parse_lora_arg(item) for item in args.lora)
    for path in loras:
        if not Path(path).is_file():
            raise TrainerError(f"LoRA file '{path}' does not exist; check the path.", field="lora")
    renderer = Renderer.load(args.model)
    image = renderer.render(RenderSettings(prompt=args.prompt, negative_prompt=args.negative, seed=args.seed,
                                           steps=args.steps, guidance=args.guidance, size=args.size,
                                           clip_skip=args.clip_skip, max_token_length=args.max_token_length),
                            loras)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .data.scan import scan_dataset

    problem = TrainConfig(caption_extension=args.caption_extension).validate().get("caption_extension")
    if problem:
        raise ConfigError({"caption_extension": problem})
    report = scan_dataset(args.data, trigger_word=args.trigger, resolution=args.resolution,
                          caption_extension=args.caption_extension)
    if not args.no_buckets:
        from .data.buckets import add_bucket_table, bucket_spec

        add_bucket_table(report, bucket_spec(args.resolution or 512))
    print(report.summary())
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import list_presets

    for name, description in list_presets().items():
        print(f"{name:20s} {description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Library chatter (optional-dependency notices) is not for the console; our own events are.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    command = {"train": cmd_train, "estimate": cmd_estimate, "generate": cmd_generate, "report": cmd_report,
               "presets": cmd_presets, "effect": cmd_effect, **FILE_COMMANDS, **CAPTION_COMMANDS}
    try:
        return command[args.command](args)
    except TrainerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
