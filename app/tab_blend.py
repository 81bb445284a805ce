"""Step 4, Blend: two or more adapters with a weight each, previewed together, saved as one .safetensors (exact,
or compacted to a rank, with how far the compacted file is from the exact blend)."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from app.common import guard, notice
from app.service import Service
from app.tab_preview import render_settings, settings_of

SLOTS = 6


@dataclass
class BlendTab:
    adapters: list[gr.Dropdown]


def build(service: Service) -> BlendTab:
    gr.Markdown("Mix adapters: each gets a weight (negative subtracts). Preview the mix, then save it as a new "
                "LoRA file that works in other tools too.")
    choices = service.adapters()
    pickers, weights, rows = [], [], []
    for i in range(SLOTS):
        with gr.Row(equal_height=True, visible=i < 2) as row:
            pickers.append(gr.Dropdown(choices, label=f"Adapter {i + 1}", scale=3, elem_id=f"blend-adapter-{i}"))
            weights.append(gr.Slider(-2, 2, 1.0 if i == 0 else 0.5, step=0.05, label="Weight", scale=2,
                                     elem_id=f"blend-weight-{i}"))
        rows.append(row)
    shown = gr.State(2)
    add = gr.Button("+ Add another adapter", size="sm")
    model = gr.Textbox(service.default_model, label="Base model for the preview")
    s = render_settings("blend")
    preview_btn = gr.Button("Preview blend", variant="primary", elem_id="blend-preview")
    image = gr.Image(label="Blend preview", interactive=False, height=320, elem_id="blend-image",
                     elem_classes=["upscale"], format="png")
    with gr.Row(equal_height=False):
        name = gr.Textbox("my-blend", label="Name of the new adapter", scale=3, elem_id="blend-name")
        rank = gr.Number(0, precision=0, minimum=0, label="Compact to rank (0 = exact)", scale=1,
                         info="0 keeps every rank (the ranks add up); R re-fits each module to rank R (smaller "
                         "file, small error)", elem_id="blend-rank")
        save_btn = gr.Button("Save blend as a new adapter", variant="primary", scale=1, elem_id="blend-save")
    status = gr.HTML(elem_id="blend-notice")
    fit = gr.Textbox(label="Fit report", lines=4, max_lines=10, interactive=False, visible=False,
                     elem_id="blend-fit")
    file = gr.File(label="Blended adapter", interactive=False, elem_id="blend-file")

    def pairs(values: tuple) -> list[tuple[str, float]]:
        paths, ws = values[:SLOTS], values[SLOTS:]
        return [(p, float(w)) for p, w in zip(paths, ws) if p]

    def on_add(n: int):
        n = min(n + 1, SLOTS)
        return [n, *[gr.update(visible=i < n) for i in range(SLOTS)]]

    @guard
    def on_preview(base_model, *values, progress=gr.Progress()):
        chosen = pairs(values[:2 * SLOTS])
        if not chosen:
            raise gr.Error("Pick at least one adapter to preview.")
        progress(0.05, desc="Rendering the blend…")
        loras: dict[str, float] = {}
        for p, w in chosen:  # the same file twice adds up, as it would in a blend
            loras[p] = loras.get(p, 0.0) + w
        return service.render(base_model, loras, **settings_of(*values[2 * SLOTS:]))

    @guard
    def on_save(blend_name, compact, *values, progress=gr.Progress()):
        compact = compact or 0
        progress(0.1, desc=f"Compacting to rank {compact:g}…" if compact else "Blending…")
        path, summary = service.save_blend(pairs(values), blend_name, compact)
        lines = summary.splitlines()
        how = lines[2] if len(lines) > 2 else ""
        text = f"Saved the blend to {path} ({how}). It is now in the Preview and Export lists."
        return notice(text, "ok"), path, gr.update(value=summary, visible=True)

    add.click(on_add, [shown], [shown, *rows])
    preview_btn.click(on_preview, [model, *pickers, *weights, *s.values()], [image], concurrency_id="render",
                      concurrency_limit=1)
    save_btn.click(on_save, [name, rank, *pickers, *weights], [status, file, fit], concurrency_id="render",
                   concurrency_limit=1)
    return BlendTab(adapters=pickers)
