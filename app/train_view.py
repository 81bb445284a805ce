"""What the Train tab draws from a job snapshot and the jobs overview: the progress card, the loss chart's
data and the queue panel.
"""
from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from app.common import fmt_seconds, notice
from app.service import JobSnapshot, Overview

CHART_POINTS = 400
CHART_MIN_STEPS = 30     # the x axis spans at least this many steps, so its ticks fall on whole steps
# After each log update, and when the Train tab is opened (a log filled while its tab was hidden, as after a
# reload, cannot scroll), show the newest line; a moment later, once the browser has drawn the new text.
FOLLOW_LOG_JS = ("() => { setTimeout(() => { const t = document.querySelector('#train-log textarea'); "
                 "if (t) { t.scrollTop = t.scrollHeight; } }, 150); }")
# The chart's series, their legend names and colours: the noisy per-step loss light, its trend dark, and the
# held-out loss in a contrasting hue (blue/orange stay apart for colour-blind eyes too).
TRAIN_SERIES, AVG_SERIES, VAL_SERIES = "training loss", "running average", "validation loss"
SERIES_COLOURS = {TRAIN_SERIES: "#a5b4fc", AVG_SERIES: "#3730a3", VAL_SERIES: "#ea580c"}
CHART_HELP = ("The training loss jumps from step to step (each step draws its own noise); its running average "
              "shows the trend. The validation loss is measured now and then on held-out images at fixed noise "
              "(Advanced settings → Validation split), so its line starts at the second measurement: if it climbs "
              "while the training loss keeps falling, the LoRA is memorising its images; train fewer steps.")
TITLES = {"starting": "Starting (the trainer process loads the data and the base model)…", "running": "Training",
          "stopping": "Stopping after this step, then saving…", "finished": "Finished",
          "stopped": "Stopped early (checkpoint and adapter saved)", "failed": "Failed",
          "interrupted": "Interrupted"}


def progress_html(s: JobSnapshot) -> str:
    if s.state == "idle":
        who = f" for run <b>{html.escape(s.run)}</b>" if s.run else ""
        return (f'<div class="notice notice-info" data-state="idle">No training yet{who}. Check the settings '
                "above, then press Start.</div>")
    pct = 100.0 * s.step / s.total_steps if s.total_steps else 0.0
    loss = f"loss <b>{s.loss:.4f}</b> (avg {s.avg_loss:.4f})" if s.loss is not None else "loss –"
    if s.validation:
        step, value = s.validation[-1]
        loss += f" · validation <b>{value:.4f}</b> " + (f"at step {step}" if step else "before training")
    speed = f"<b>{s.it_per_s:.2f}</b> it/s" if s.it_per_s else "– it/s"
    eta = f"ETA <b>{fmt_seconds(s.eta_s)}</b>" if s.active else f"took {fmt_seconds(s.seconds)}"
    parts = [f'<div class="progress-card state-{s.state}" data-state="{s.state}" data-step="{s.step}" '
             f'data-run="{html.escape(s.run)}">',
             f'<div class="progress-head"><span>{TITLES[s.state]} — run <b>{html.escape(s.run)}</b></span>'
             f'<span class="progress-steps">step <b>{s.step}</b> / {s.total_steps or "?"}</span></div>',
             f'<div class="bar"><div class="fill" style="width:{pct:.1f}%"></div></div>',
             f'<div class="progress-stats">{loss} · {speed} · {eta} · epoch {s.epoch + 1}</div></div>']
    if s.state in ("finished", "stopped") and s.result:
        parts.append(notice(f"Adapter saved: {s.result}\nTry it on the Preview tab, or download it on the "
                            "Export tab." + ("\nResume continues the run to its full step count."
                                             if s.state == "stopped" else ""), "ok"))
    if s.state == "failed":
        parts.append(notice(s.error or "Training failed; see the log below.", "error"))
    if s.state == "interrupted":
        parts.append(notice((s.error or "The trainer process ended without finishing.") +
                            "\nPress Resume to continue it.", "warn"))
    return "".join(parts)


def loss_frame(s: JobSnapshot) -> pd.DataFrame | None:
    """The chart's data: loss and its running average per step, and the validation loss when the run has
    held-out images (None before the first step: Gradio's LinePlot keeps an empty colour legend forever when
    its first frame has no rows). Series are named as the legend shows them (``SERIES_COLOURS``)."""
    hist = s.history
    if not hist:
        return None
    if len(hist) > CHART_POINTS:  # keep the chart light: evenly spaced points, always the last one
        stride = len(hist) / CHART_POINTS
        hist = tuple(hist[int(i * stride)] for i in range(CHART_POINTS)) + (hist[-1],)
    val = s.validation
    return pd.DataFrame({
        "step": pd.Series([h[0] for h in hist] * 2 + [v[0] for v in val], dtype="int64"),
        "loss": pd.Series([h[1] for h in hist] + [h[2] for h in hist] + [v[1] for v in val], dtype="float64"),
        "series": pd.Series([TRAIN_SERIES] * len(hist) + [AVG_SERIES] * len(hist) + [VAL_SERIES] * len(val),
                            dtype="str")})


def chart_update(s: JobSnapshot) -> dict:
    """The chart's data with its x axis from step 0 to the run's step count (at least ``CHART_MIN_STEPS``):
    whole-step ticks from the first point on, and a line that grows across the chart as the run goes."""
    last = s.history[-1][0] if s.history else 0
    return gr.update(value=loss_frame(s), x_lim=[0, max(s.total_steps or 0, last, CHART_MIN_STEPS)])


def queue_html(o: Overview) -> str:
    """The run training now and the runs waiting, in order (empty when neither)."""
    cur = o.current
    rows = []
    if cur.active:
        rows.append(f'<div class="queue-now">Now training: <b>{html.escape(cur.run)}</b> — step {cur.step} / '
                    f'{cur.total_steps or "?"}</div>')
    if o.queue:
        items = "".join(f'<li data-run="{html.escape(q.run)}"><b>{html.escape(q.run)}</b> — queued, '
                        f'{o.ahead(q.run)} ahead{" (resume)" if q.kind == "resume" else ""}</li>' for q in o.queue)
        rows.append(f'<div class="queue-title">Queue (starts in this order; one run trains at a time)</div>'
                    f'<ol class="queue-list">{items}</ol>')
    rows.extend(f'<div class="queue-note">{html.escape(n)}</div>' for n in o.notes)
    return f'<div class="queue-card">{"".join(rows)}</div>' if rows else ""

