"""Step 3, Preview: base vs adapted image for the same seed, a -1..2 strength slider that never reloads
the model, and a strength-sweep grid. Adapters come from this app's runs or an uploaded .safetensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from app.common import guard, notice
from app.effect_view import preview_section
from app.service import Service

DEFAULT_SWEEP = "0, 0.25, 0.5, 0.75, 1"


@dataclass
class PreviewTab:
    adapter: gr.Dropdown
    prompt: gr.Textbox


def render_settings(prefix: str) -> dict[str, gr.components.Component]:
    """Prompt, negative prompt, seed, steps, CFG and size inputs (shared by Preview and Blend)."""
    prompt = gr.Textbox(label="Prompt", placeholder="zkw, a zkw emblem on a white background", lines=2,
                        elem_id=f"{prefix}-prompt")
    negative = gr.Textbox(label="Negative prompt", placeholder="blurry, low quality", elem_id=f"{prefix}-negative")
    with gr.Row(equal_height=True):
        seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id=f"{prefix}-seed")
        steps = gr.Slider(1, 100, 20, step=1, label="Steps", elem_id=f"{prefix}-steps")
        cfg = gr.Slider(1, 20, 7, step=0.5, label="CFG (guidance)", elem_id=f"{prefix}-cfg")
        size = gr.Number(0, label="Size in px (0 = model's native)", precision=0, minimum=0,
                         elem_id=f"{prefix}-size")
    return {"prompt": prompt, "negative_prompt": negative, "seed": seed, "steps": steps, "guidance": cfg,
            "size": size}


def settings_of(prompt, negative, seed, steps, cfg, size) -> dict:
    return {"prompt": prompt or "", "negative_prompt": negative or "", "seed": int(seed or 0),
            "steps": int(steps), "guidance": float(cfg), "size": int(size or 0) or None}


def build(service: Service) -> PreviewTab:
    gr.Markdown("Compare the base model with your adapter for the same seed. Moving the strength slider "
                "re-renders without reloading anything.")
    with gr.Row(equal_height=True):
        with gr.Column(scale=3):
            adapter = gr.Dropdown(service.adapters(), label="Adapter", elem_id="preview-adapter",
                                  info="Trained here (run/name.safetensors), blended, or uploaded.")
            model = gr.Textbox(service.default_model, label="Base model",
                               info="The model the adapter was trained for: 'builtin', a path, or a hub id.")
        upload = gr.File(label="…or upload a LoRA (.safetensors) from another tool", file_types=[".safetensors"],
                         height=140, scale=2, elem_id="preview-upload")
    info = gr.HTML(elem_id="preview-notice")
    s = render_settings("preview")
    strength = gr.Slider(-1, 2, 1, step=0.05, label="Adapter strength", elem_id="preview-strength",
                         info="0 = base model, 1 = as trained, above 1 = exaggerated, below 0 = the opposite.")
    render_btn = gr.Button("Render base and adapted", variant="primary", elem_id="preview-render")
    with gr.Row(equal_height=True):
        base_img = gr.Image(label="Base model (strength 0)", interactive=False, elem_id="preview-base",
                            elem_classes=["upscale"], height=320, format="png")
        lora_img = gr.Image(label="With adapter", interactive=False, elem_id="preview-adapted",
                            elem_classes=["upscale"], height=320, format="png")
    with gr.Row(equal_height=False):
        strengths = gr.Textbox(DEFAULT_SWEEP, label="Strength sweep", scale=3, elem_id="sweep-strengths",
                               info="Comma-separated strengths, one image each, same seed.")
        sweep_btn = gr.Button("Render sweep", scale=1, elem_id="sweep-btn")
    grid = gr.Gallery(label="Strength sweep", columns=5, elem_id="sweep-grid", format="png", object_fit="contain",
                      elem_classes=["upscale"])
    preview_section(service, adapter, model)

    inputs = [s["prompt"], s["negative_prompt"], s["seed"], s["steps"], s["guidance"], s["size"]]

    @guard
    def on_render(path, base_model, weight, *settings, progress=gr.Progress()):
        progress(0.05, desc="Loading the base model (first time only) and rendering…")
        base, adapted = service.compare(base_model, path, weight, **settings_of(*settings))
        return base, gr.update(value=adapted, label=f"With adapter (strength {weight:g})")

    @guard
    def on_strength(path, base_model, weight, *settings):
        image = service.render(base_model, {path: weight}, **settings_of(*settings)) if path else None
        return gr.update(value=image, label=f"With adapter (strength {weight:g})")

    @guard
    def on_sweep(path, base_model, text, *settings, progress=gr.Progress()):
        try:
            values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
        except ValueError:
            raise gr.Error(f"Strengths {text!r} must be numbers separated by commas, e.g. {DEFAULT_SWEEP}.")
        if not values:
            raise gr.Error(f"Give at least one strength, e.g. {DEFAULT_SWEEP}.")
        out = []
        for i, v in enumerate(values):
            progress((i, len(values)), desc=f"strength {v:g}")
            out += service.sweep(base_model, path, [v], **settings_of(*settings))
        return out

    @guard
    def on_upload(file):
        if not file:
            return gr.skip(), gr.skip()
        path = service.import_adapter(file)
        return gr.update(choices=service.adapters(), value=path), notice(f"Added {path}.", "ok")

    def on_adapter(path, current):
        if not path or (current or "").strip():
            return gr.skip()
        return service.suggest_prompt(path) or gr.skip()

    render_btn.click(on_render, [adapter, model, strength, *inputs], [base_img, lora_img],
                     concurrency_id="render", concurrency_limit=1)
    strength.release(on_strength, [adapter, model, strength, *inputs], [lora_img], concurrency_id="render",
                     concurrency_limit=1, trigger_mode="always_last")
    sweep_btn.click(on_sweep, [adapter, model, strengths, *inputs], [grid], concurrency_id="render",
                    concurrency_limit=1)
    upload.upload(on_upload, [upload], [adapter, info])
    adapter.change(on_adapter, [adapter, s["prompt"]], [s["prompt"]], show_progress="hidden")
    return PreviewTab(adapter=adapter, prompt=s["prompt"])
