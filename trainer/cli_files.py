"""Command line of the adapter file tools: `inspect`, `blend`, `resize`, `bake`, `convert`. Each parses its flags,
calls the library function in ``trainer.files`` and prints its summary; the last stdout line is the file written."""
from __future__ import annotations

import argparse
import json


def add_file_commands(sub) -> None:
    """Add the file-tool subcommands to ``sub`` (the main parser's subparsers)."""
    i = sub.add_parser("inspect", help="describe a LoRA/LyCORIS file: format, architecture, modules, metadata, "
                                       "warnings")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print the report as JSON")

    b = sub.add_parser("blend", help="blend weighted LoRA files into one (exact, or compacted to --rank R)")
    b.add_argument("items", nargs="+", metavar="FILE[:WEIGHT]", help="files with weights; negative subtracts")
    b.add_argument("--out", required=True, help=".safetensors file to write")
    b.add_argument("--rank", type=int, help="compact to rank R by SVD of each module's summed change "
                                            "(also takes LoHa/LoKr; error reported)")
    b.add_argument("--model", help="base model, needed to compact DoRA files")

    r = sub.add_parser("resize", help="re-factorise a LoRA to a rank or an energy threshold by SVD")
    r.add_argument("file")
    target = r.add_mutually_exclusive_group(required=True)
    target.add_argument("--rank", type=int, help="fixed rank per module")
    target.add_argument("--energy", type=float, help="smallest rank per module keeping this share of its squared "
                                                     "Frobenius norm, e.g. 0.95")
    r.add_argument("--out", required=True, help=".safetensors file to write")
    r.add_argument("--model", help="base model, needed for DoRA files")

    k = sub.add_parser("bake", help="merge LoRAs into a base model: a diffusers folder or a single .safetensors")
    k.add_argument("--model", required=True, help="'builtin', a diffusers folder, a .safetensors/.ckpt or a hub id")
    k.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]", help="repeatable")
    k.add_argument("--out", required=True, help="FILE.safetensors (single file, LDM layout) or a new folder")
    k.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="weights written (fp32)")
    k.add_argument("--config-dir", help="diffusers config folder for a single-file --model")

    c = sub.add_parser("convert", help="convert a LoRA between the kohya and the diffusers/PEFT layouts")
    c.add_argument("file")
    c.add_argument("--to", required=True, choices=("kohya", "peft"))
    c.add_argument("--out", required=True, help=".safetensors file to write")
    c.add_argument("--model", help="base model or config folder whose module names to use (default: the "
                                   "shipped SD1/SDXL configs)")


def _items(texts: list[str]) -> list[tuple[str, float]]:
    from .render.generate import parse_lora_arg
    return [parse_lora_arg(t) for t in texts]


def cmd_inspect(args: argparse.Namespace) -> int:
    from .files.inspect import inspect_file
    report = inspect_file(args.file)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0


def cmd_blend(args: argparse.Namespace) -> int:
    from .files.blend import blend
    report = blend(_items(args.items), args.out, rank=args.rank, model=args.model)
    print(report.summary())
    print(report.path)
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from .files.svd import resize_file
    report = resize_file(args.file, args.out, rank=args.rank, energy=args.energy, model=args.model)
    print(report.summary())
    print(report.path)
    return 0


def cmd_bake(args: argparse.Namespace) -> int:
    from .files.bake import bake
    result = bake(args.model, _items(args.lora), args.out, dtype=args.dtype, config_dir=args.config_dir)
    print(result.summary())
    print(result.path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .files.convert import convert_file
    result = convert_file(args.file, args.out, to=args.to, model=args.model)
    print(result.summary())
    print(result.path)
    return 0


FILE_COMMANDS = {"inspect": cmd_inspect, "blend": cmd_blend, "resize": cmd_resize, "bake": cmd_bake,
                 "convert": cmd_convert}
