"""Step 5, Export: download an adapter (kohya/A1111 format, or a diffusers/PEFT copy), see where it lies
on disk and what its metadata says.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app.common import guard, notice
from app.service import Service

FACTS = [("base", "ss_sd_model_name"), ("architecture", "modelspec.architecture"), ("rank", "ss_network_dim"),
         ("alpha", "ss_network_alpha"), ("steps", "ss_steps"), ("images", "ss_num_train_images"),
         ("resolution", "ss_resolution"), ("trigger", "modelspec.trigger_phrase"),
         ("blended from", "modelspec.merged_from")]
FORMATS = [("kohya / A1111 / ComfyUI (.safetensors)", "kohya"), ("diffusers / PEFT (.safetensors)", "diffusers"),
           ("portable kohya, without projector layers (.safetensors)", "portable")]


@dataclass
class ExportTab:
    adapter: gr.Dropdown


def build(service: Service) -> ExportTab:
    gr.Markdown("Download an adapter. The kohya format loads in AUTOMATIC1111/Forge and ComfyUI (put it in "
                "`models/Lora`); the diffusers format loads with `pipe.load_lora_weights(...)`.")
    with gr.Row(equal_height=True):
        adapter = gr.Dropdown(service.adapters(), label="Adapter", scale=3, elem_id="export-adapter")
        fmt = gr.Radio(FORMATS, value="kohya", label="Format", scale=2, elem_id="export-format")
    export_btn = gr.Button("Prepare download", variant="primary", elem_id="export-btn")
    where = gr.HTML(elem_id="export-where")
    file = gr.File(label="Download", interactive=False, elem_id="export-file")
    meta = gr.JSON(label="Metadata", elem_id="export-meta", open=False)

    @guard
    def on_pick(path):
        if not path:
            return "", None
        info = service.adapter_info(path)
        meta = info["metadata"]
        facts = [(label, meta.get(key)) for label, key in FACTS if meta.get(key) not in (None, "", "None")]
        chips = "".join(f'<span class="stat">{html.escape(k)} <b>{html.escape(str(v))}</b></span>' for k, v in facts)
        text = (f'<div class="where">On disk: <code>{html.escape(info["path"])}</code> · {info["size_mb"]} MB · '
                f'{info["modules"]} modules</div><div class="facts">{chips}</div>')
        return text, dict(sorted(meta.items()))

    @guard
    def on_export(path, kind, progress=gr.Progress()):
        if kind == "diffusers":
            progress(0.1, desc="Converting (loads the base model once)…")
        out = service.export(path, kind)
        return out, notice(f"Ready: {Path(out).name} — click the file below to download it.", "ok") + on_pick(path)[0]

    adapter.change(on_pick, [adapter], [where, meta])
    export_btn.click(on_export, [adapter, fmt], [file, where], concurrency_id="render", concurrency_limit=1)
    return ExportTab(adapter=adapter)
