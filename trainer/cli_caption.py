"""Command line of auto-captioning: `caption --data DIR --model PATH [--overwrite] [--prefix TRIGGER]` writes one
caption file per image with a local captioning model (trainer/data/autocaption.py) and prints what it did."""
from __future__ import annotations

import argparse
import sys


def add_caption_command(sub) -> None:
    """Add the `caption` subcommand to ``sub`` (the main parser's subparsers)."""
    c = sub.add_parser("caption", help="write a caption file for each image with a local captioning model "
                                       "(BLIP, BLIP-2, GIT, Florence-2 folder, or a WD14 ONNX tagger)")
    c.add_argument("--data", required=True, help="the dataset folder (kohya <repeats>_<name> subfolders too)")
    c.add_argument("--model", default="", help="local folder of the captioning model: a transformers "
                                               "image-to-text model saved with save_pretrained, or a WD14 tagger "
                                               "(model.onnx + selected_tags.csv; needs onnxruntime)")
    c.add_argument("--overwrite", action="store_true", help="caption every image, replacing existing captions "
                                                            "(default: only images without one)")
    c.add_argument("--prefix", default="", metavar="TRIGGER", help="put this word first in every caption written")
    c.add_argument("--caption-extension", default=".txt", metavar="EXT",
                   help="extension of the caption files (default .txt), as training reads them")
    c.add_argument("--batch-size", type=int, default=4, help="images captioned at once (default 4)")
    c.add_argument("--max-new-tokens", type=int, default=40, help="longest caption in tokens (default 40)")


def cmd_caption(args: argparse.Namespace) -> int:
    from .data.autocaption import caption_folder, dataset_images, load_captioner
    from .errors import TrainerError

    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise TrainerError(f"--batch-size {args.batch_size} / --max-new-tokens {args.max_new_tokens}: both must be "
                           "at least 1.", field="caption")
    dataset_images(args.data)                       # a wrong folder is named before a model loads
    captioner = load_captioner(args.model, max_new_tokens=args.max_new_tokens)

    def progress(done: int, total: int) -> None:
        print(f"captioned {done}/{total}", file=sys.stderr)

    result = caption_folder(args.data, captioner, overwrite=args.overwrite, prefix=args.prefix,
                            caption_extension=args.caption_extension, batch_size=args.batch_size,
                            progress=progress)
    print(result.summary())
    return 1 if result.failed else 0


CAPTION_COMMANDS = {"caption": cmd_caption}
