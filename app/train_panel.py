"""The Train tab's run panel: Start (or queue) / Stop / Resume / Sample now / Save now, the estimate line, the
notice, progress, the queue, the loss chart, samples and the log, and the timer that redraws them from
``Service.job_view`` (what changed only)."""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.service import JobSnapshot, Service
from app.train_view import CHART_HELP, FOLLOW_LOG_JS, SERIES_COLOURS, chart_update, progress_html, queue_html


@dataclass
class Panel:
    """The run controls and what they report: buttons, the notice line, progress, the queue (and its Remove),
    chart, samples, log; ``seen`` is the page's last drawn view and queue."""

    gpus: gr.Number
    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    sample_now: gr.Button
    save_now: gr.Button
    notice: gr.HTML
    progress: gr.HTML
    queue: gr.HTML
    queue_row: gr.Row
    queue_pick: gr.Dropdown
    queue_remove: gr.Button
    chart: gr.LinePlot
    samples: gr.Gallery
    log: gr.Textbox
    timer: gr.Timer
    seen: gr.State
    estimate: gr.HTML                 # the preflight line under Start (app/estimate_view.py)
    estimate_btn: gr.Button


def run_panel(gpu_count: int) -> Panel:
    """``gpu_count`` > 1 shows the GPUs number (a run on N > 1 is launched with accelerate)."""
    with gr.Row():
        gpus = gr.Number(1, precision=0, minimum=1, maximum=max(gpu_count, 1), label=f"GPUs (of {gpu_count})",
                         visible=gpu_count > 1, scale=1, min_width=90, elem_id="train-gpus")
        start = gr.Button("Start training", variant="primary", elem_id="start-btn", scale=3)
        stop = gr.Button("Stop", variant="stop", elem_id="stop-btn", interactive=False, scale=1)
        resume = gr.Button("Resume", variant="secondary", elem_id="resume-btn", visible=False, scale=1)
        sample_now = gr.Button("Sample now", size="sm", scale=1)
        save_now = gr.Button("Save now", size="sm", scale=1)
    with gr.Row(equal_height=True):
        estimate = gr.HTML(elem_id="train-estimate")
        estimate_btn = gr.Button("Estimate memory and time", size="sm", scale=0, min_width=200, elem_id="estimate-btn")
    form_notice = gr.HTML(elem_id="train-notice")
    progress = gr.HTML(progress_html(JobSnapshot()), elem_id="train-progress")
    queue = gr.HTML(elem_id="train-queue")
    with gr.Row(visible=False, equal_height=True, elem_id="queue-row") as queue_row:
        queue_pick = gr.Dropdown([], label="Queued run", elem_id="queue-pick", scale=3)
        queue_remove = gr.Button("Remove from queue", size="sm", elem_id="queue-remove-btn", scale=1)
    with gr.Row(equal_height=True):
        with gr.Column(scale=3):
            chart = gr.LinePlot(None, x="step", y="loss", color="series", color_title="", label="Loss",
                                color_map=SERIES_COLOURS, elem_id="loss-plot", x_title="step", y_title="loss",
                                x_axis_format="d")
            # below the chart, not its caption: Gradio draws a LinePlot caption under the next block
            gr.HTML(f'<div style="font-size:0.85em;color:var(--body-text-color-subdued)">'
                    f"{html.escape(CHART_HELP)}</div>", elem_id="loss-help")
        samples = gr.Gallery(label="Samples during training", columns=3, height=280, elem_id="train-samples",
                             scale=2)
    log = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, interactive=False, elem_id="train-log")
    timer = gr.Timer(1.0)
    seen = gr.State({})
    return Panel(gpus, start, stop, resume, sample_now, save_now, form_notice, progress, queue, queue_row, queue_pick,
                  queue_remove, chart, samples, log, timer, seen, estimate, estimate_btn)


# -- wiring ----------------------------------------------------------------------------------


def wire_progress(service: Service, run: gr.Dropdown, panel: Panel) -> None:
    """Every second (and when the picked run changes), show what ``Service.job_view`` gives for the picked run
    and the queue; each part is redrawn only when it changed."""
    outputs = [panel.seen, panel.progress, panel.chart, panel.samples, panel.log, panel.stop, panel.resume,
               panel.start, panel.queue, panel.queue_row, panel.queue_pick]

    def on_tick(seen: dict, run_name: str):
        s, o = service.job_view(run_name)
        view, names = f"{s.run}|{s.version}", [q.run for q in o.queue]
        now = {"view": view, "overview": o.version, "queue": names}
        out: list[Any] = [now]
        if view != seen.get("view"):
            current = o.current.active and o.current.run == s.run
            out += [progress_html(s), chart_update(s), list(s.samples), "\n".join(s.logs),
                    gr.update(interactive=s.active), gr.update(visible=s.resumable and not current)]
        else:
            out += [gr.skip()] * 6
        if o.version != seen.get("overview"):
            out += [gr.update(value="Add to queue" if o.current.active else "Start training"), queue_html(o)]
        else:
            out += [gr.skip()] * 2
        if names != seen.get("queue"):
            out += [gr.update(visible=bool(names)), gr.update(choices=names, value=names[0] if names else None)]
        else:
            out += [gr.skip()] * 2
        return out

    panel.timer.tick(on_tick, [panel.seen, run], outputs, show_progress="hidden", queue=False)
    run.change(on_tick, [panel.seen, run], outputs, show_progress="hidden", queue=False)
    panel.log.change(None, None, None, js=FOLLOW_LOG_JS)
