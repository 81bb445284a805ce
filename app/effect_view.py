"""The "did it learn?" check as pages show it: the verdict card (verdict, the one-line scores, advice) and the grid
image, in the Train tab when a run finishes and in the Preview tab on demand for any adapter.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.common import guard
from app.service import Service

KINDS = {"strong": "ok", "weak": "warn", "none": "error", "overbaked": "error", "unknown": "info"}
HELP = ("Rows: adapter strength 0 (base model), 0.5, 1, 1.5; columns: fixed seeds, one block per prompt (the "
        "trigger word, then the dataset's captions). Each number is the image's similarity to the training images.")


def effect_html(effect: dict[str, Any] | None) -> str:
    """The verdict card; empty when there is no result."""
    if not effect or not effect.get("verdict"):
        return ""
    verdict = str(effect["verdict"])
    line, advice = html.escape(str(effect.get("line") or verdict)), html.escape(str(effect.get("advice", "")))
    kind = KINDS.get(verdict, "info")
    return (f'<div class="notice notice-{kind} effect-card" data-verdict="{html.escape(verdict)}">'
            f"<b>Did it learn?</b> effect: <b>{line}</b><br>{advice}<br><small>{html.escape(HELP)}</small></div>")


@dataclass
class EffectPanel:
    card: gr.HTML
    grid: gr.Image

    @property
    def outputs(self) -> list:
        return [self.card, self.grid]

    def show(self, effect: dict[str, Any] | None) -> list:
        grid = (effect or {}).get("grid") or None
        return [effect_html(effect), gr.update(value=grid, visible=bool(grid))]


def panel(prefix: str) -> EffectPanel:
    card = gr.HTML(elem_id=f"{prefix}-effect")
    grid = gr.Image(label="Effect check: strengths (rows) x seeds (columns)", interactive=False, visible=False,
                    format="png", elem_id=f"{prefix}-effect-grid", show_label=False)
    return EffectPanel(card, grid)


def train_panel(service: Service, run: gr.Dropdown) -> EffectPanel:
    """The Train tab's effect panel for the picked run: hidden until its check has run, redrawn (every 2 s and
    when the run changes) only when the result changed."""
    p = panel("train")
    seen = gr.State("")

    def on_tick(last: str, run_name: str):
        s, _ = service.job_view(run_name)
        effect = dict(s.effect) if s.effect else None
        key = f"{s.run}|{effect}"
        return [gr.skip()] * 3 if key == last else [key, *p.show(effect)]

    gr.Timer(2.0).tick(on_tick, [seen, run], [seen, *p.outputs], show_progress="hidden", queue=False)
    run.change(on_tick, [seen, run], [seen, *p.outputs], show_progress="hidden", queue=False)
    return p


def preview_section(service: Service, adapter: gr.Dropdown, model: gr.Textbox) -> EffectPanel:
    """'Check effect' for the picked adapter: renders it at strengths 0-1.5 against a dataset (its run's, or a
    folder given here) and shows the verdict and the grid."""
    with gr.Accordion("Did it learn? (effect check)", open=False, elem_id="preview-effect-box"):
        with gr.Row(equal_height=True):
            data = gr.Textbox(label="Training images folder", scale=3, elem_id="preview-effect-data",
                              placeholder="empty = the adapter's own run dataset",
                              info="The check compares renders with these images.")
            button = gr.Button("Check effect", scale=1, elem_id="preview-effect-btn")
        p = panel("preview")

    @guard
    def on_check(path, base_model, folder, progress=gr.Progress()):
        progress(0.05, desc="Rendering strengths 0, 0.5, 1, 1.5 for a few seeds…")
        return p.show(service.check_effect(base_model, path, folder))

    button.click(on_check, [adapter, model, data], p.outputs, concurrency_id="render", concurrency_limit=1)
    return p
