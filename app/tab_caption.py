"""The Dataset tab's auto-captioning row: a captioning model folder and "Caption missing" / "Caption all"; the
captions land in the caption files, so the editor below shows them (service: app/captioning.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gradio as gr

from app.common import guard, notice
from app.service import Service, TrainerError


@dataclass
class CaptionTools:
    model: gr.Textbox
    use_trigger: gr.Checkbox
    missing: gr.Button
    every: gr.Button


def build() -> CaptionTools:
    with gr.Accordion("Auto-caption", open=False, elem_id="caption-accordion"):
        with gr.Row(equal_height=True):
            model = gr.Textbox(label="Captioning model folder", scale=3, elem_id="caption-model",
                               placeholder="/models/blip-image-captioning-base",
                               info="A folder on this server: a transformers image-to-text model (BLIP, BLIP-2, GIT, "
                                    "Florence-2, saved with save_pretrained) or a WD14 tagger (model.onnx + "
                                    "selected_tags.csv; needs onnxruntime). Nothing is downloaded.")
            use_trigger = gr.Checkbox(True, label="Put the trigger word first", scale=1, elem_id="caption-prefix")
        with gr.Row(equal_height=True):
            missing = gr.Button("Caption missing", size="sm", variant="primary", elem_id="caption-missing-btn")
            every = gr.Button("Caption all (replaces every caption)", size="sm", variant="stop",
                              elem_id="caption-all-btn")
    return CaptionTools(model, use_trigger, missing, every)


def connect(service: Service, tools: CaptionTools, run: gr.Dropdown, caption_extension: gr.components.Component,
            trigger: gr.Textbox, outs: list, state: Callable[[str], dict]) -> None:
    """Both buttons write captions, then redraw the dataset (``outs`` = status, items; ``state`` makes items)."""

    def handler(overwrite: bool):
        @guard
        def caption(run_name: str, model: str, ext: str, trig: str, use_trigger: bool, progress=gr.Progress()):
            progress(0.0, desc="Loading the captioning model…")
            try:
                note = service.caption_dataset(run_name, model, overwrite=overwrite,
                                               prefix=(trig or "") if use_trigger else "", caption_extension=ext,
                                               progress=lambda done, total: progress(
                                                   done / max(total, 1), desc=f"Captioned {done}/{total}"))
            except TrainerError as err:   # no model, a wrong folder...: said where the status line stays
                return notice(str(err), "error"), gr.skip()
            return notice(note, "warn" if "could not be read" in note else "ok"), state(run_name)
        return caption

    inputs = [run, tools.model, caption_extension, trigger, tools.use_trigger]
    tools.missing.click(handler(False), inputs, outs, concurrency_id="render", concurrency_limit=1)
    tools.every.click(handler(True), inputs, outs, concurrency_id="render", concurrency_limit=1)
