"""Step 5, Export: download an adapter (kohya/A1111 format, or a diffusers/PEFT copy), see where it lies
on disk, what it holds and what its metadata says; convert it to the other layout, or bake it into its base model.
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
BAKE_FORMATS = [("one .safetensors checkpoint (A1111, ComfyUI)", "file"), ("diffusers folder", "folder")]
CONVERT_TARGETS = [("kohya (A1111, ComfyUI)", "kohya"), ("PEFT / diffusers", "peft")]


@dataclass
class ExportTab:
    adapter: gr.Dropdown


def build(service: Service) -> ExportTab:
    gr.Markdown("Download an adapter. The kohya format loads in AUTOMATIC1111/Forge and ComfyUI (put it in "
                "`models/Lora`); the diffusers format loads with `pipe.load_lora_weights(...)`.")
    with gr.Row(equal_height=True):
        # no value yet: opening the tab picks the newest, and that change fills in what the file holds
        adapter = gr.Dropdown(service.adapters(), value=None, label="Adapter", scale=3, elem_id="export-adapter")
        fmt = gr.Radio(FORMATS, value="kohya", label="Format", scale=2, elem_id="export-format")
    export_btn = gr.Button("Prepare download", variant="primary", elem_id="export-btn")
    where = gr.HTML(elem_id="export-where")
    file = gr.DownloadButton("Download", variant="primary", visible=False, elem_id="export-file")
    report = gr.Textbox(label="What the file holds", lines=8, max_lines=16, interactive=False, visible=False,
                        elem_id="export-inspect")
    meta = gr.JSON(label="Metadata", elem_id="export-meta", open=False)
    with gr.Accordion("Convert to the other layout", open=False, elem_id="export-convert"):
        with gr.Row(equal_height=True):
            target = gr.Radio(CONVERT_TARGETS, value="peft", label="Convert to", scale=3, elem_id="convert-to")
            convert_btn = gr.Button("Convert", scale=1, elem_id="convert-btn")
        convert_notice = gr.HTML(elem_id="convert-notice")
    with gr.Accordion("Bake into the base model", open=False, elem_id="export-bake"):
        bake_model = gr.Markdown("Pick an adapter first.", elem_id="bake-model")
        with gr.Row(equal_height=True):
            bake_weight = gr.Slider(-2, 2, 1.0, step=0.05, label="Weight", scale=2, elem_id="bake-weight")
            bake_fmt = gr.Radio(BAKE_FORMATS, value="file", label="Write as", scale=3, elem_id="bake-format")
        bake_btn = gr.Button("Bake (loads the base model)", variant="primary", elem_id="bake-btn")
        bake_notice = gr.HTML(elem_id="bake-notice")

    def on_pick(path):
        return [*_facts(path), *_contents(path)]

    @guard
    def _facts(path):
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
    def _contents(path):
        if not path:
            return gr.update(value="", visible=False), "Pick an adapter first."
        model = service.adapter_model(path)
        return (gr.update(value=service.inspect(path), visible=True),
                f"Merges the adapter into its base model, **{model}**, and writes the result under "
                "`outputs/_baked/`.")

    @guard
    def on_convert(path, to, progress=gr.Progress()):
        progress(0.1, desc=f"Converting to {to}…")
        written = service.convert(path, to)
        return notice(f"{_sentence(written.summary)}. It is now in the Preview and Blend lists.", "ok")

    @guard
    def on_bake(path, weight, fmt, progress=gr.Progress()):
        progress(0.05, desc="Loading the base model and merging…")
        written = service.bake(path, weight, fmt)
        return notice(f"Baked the adapter into its base model.\n{_sentence(written.summary)}.", "ok")

    @guard
    def on_export(path, kind, progress=gr.Progress()):
        if kind == "diffusers":
            progress(0.1, desc="Converting (loads the base model once)…")
        out = service.export(path, kind)
        name = Path(out).name
        size = f"{Path(out).stat().st_size / 1e6:.1f} MB"
        return (gr.update(value=out, label=f"⬇ Download {name} ({size})", visible=True),
                notice(f"Ready: {name} — press the Download button below.", "ok") + _facts(path)[0])

    adapter.change(on_pick, [adapter], [where, meta, report, bake_model])
    # another adapter or format: the prepared file no longer matches, so hide its button until prepared again
    for picker in (adapter, fmt):
        picker.change(lambda: gr.update(visible=False), None, [file], show_progress="hidden")
    convert_btn.click(on_convert, [adapter, target], [convert_notice])
    bake_btn.click(on_bake, [adapter, bake_weight, bake_fmt], [bake_notice], concurrency_id="render",
                   concurrency_limit=1)
    export_btn.click(on_export, [adapter, fmt], [file, where], concurrency_id="render", concurrency_limit=1)
    return ExportTab(adapter=adapter)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]
