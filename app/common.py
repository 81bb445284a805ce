"""Small helpers the tabs share: turning service errors into readable page messages, and labels."""
from __future__ import annotations

import functools
import html
import sys
import traceback
from typing import Any, Callable

import gradio as gr

from app.service import TrainerError

# Friendlier labels than the field names; anything missing is derived from the name.
LABELS = {
    "model": "Base model", "name": "Adapter name", "trigger_word": "Trigger word",
    "rank": "Rank (r)", "alpha": "Alpha", "learning_rate": "UNet learning rate",
    "text_encoder_lr": "Text-encoder learning rate", "max_train_steps": "Steps",
    "epochs": "Epochs", "batch_size": "Batch size", "resolution": "Resolution (px)",
    "seed": "Seed", "train_unet": "UNet cross-attention", "train_text_encoder": "Text encoder(s)",
    "sample_every_n_steps": "Sample every N steps (0 = off)", "sample_prompts": "Sample prompts (one per line)",
    "min_snr_gamma": "Min-SNR gamma", "lr_scheduler": "LR schedule", "lr_warmup_steps": "Warm-up steps",
    "unet_targets": "UNet target modules", "text_encoder_targets": "Text-encoder target modules",
    "arch": "Architecture", "save_every_n_steps": "Save a checkpoint every N steps (0 = only at the end)",
    "export_diffusers": "Also write a diffusers/PEFT-format copy",
}


def label(name: str) -> str:
    return LABELS.get(name) or name.replace("_", " ").capitalize()


def guard(fn: Callable) -> Callable:
    """Run a UI callback; a TrainerError (or any surprise) becomes a message in the page."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except TrainerError as err:
            raise gr.Error(str(err), title="Cannot do that", print_exception=False) from None
        except Exception as err:  # noqa: BLE001 - the person at the page must still learn what happened
            traceback.print_exc(file=sys.stderr)
            raise gr.Error(f"Unexpected error: {type(err).__name__}: {err}", title="Something went wrong",
                           print_exception=False) from None

    return wrapper


def notice(text: str, kind: str = "info") -> str:
    """An inline notice (HTML) shown inside the page: kind is info / ok / warn / error."""
    if not text:
        return ""
    body = "<br>".join(html.escape(line) for line in text.strip().splitlines())
    return f'<div class="notice notice-{kind}">{body}</div>'


def fmt_seconds(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "–"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
