"""The page: a run picker above five numbered steps (Dataset, Train, Preview, Blend, Export).

``build_app(service)`` returns the Blocks; ``launch_options(service)`` holds what Gradio 6 takes at
``launch()`` (theme, css, allowed paths). All state lives in the service or in per-page gr.State.
"""
from __future__ import annotations

import gradio as gr

from app import page_state, tab_blend, tab_dataset, tab_export, tab_preview, tab_train
from app.common import notice
from app.service import Service
from app.train_view import FOLLOW_LOG_JS

CSS = """
.gradio-container { max-width: 1280px !important; margin: auto; }
#app-title h1 { margin-bottom: 0; }
.notice { border-radius: 8px; padding: 8px 12px; margin: 4px 0; font-size: 0.92em; }
.notice-info { background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary); }
.notice-ok { background: #e8f6ec; border: 1px solid #7cc492; color: #14532d; }
.notice-warn { background: #fff7e0; border: 1px solid #e8c25c; color: #6b4700; }
.notice-error { background: #fdecec; border: 1px solid #e58a8a; color: #7f1d1d; }
.report { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; margin: 4px 0; }
.report-title { font-weight: 600; margin-right: 6px; }
.stat { background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary);
        border-radius: 999px; padding: 2px 10px; font-size: 0.9em; }
.stat-warn { border-color: #e8c25c; background: #fff7e0; }
.caption-card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px; gap: 4px !important; }
.caption-card img { object-fit: contain; }
.file-name { font-size: 0.8em; color: var(--body-text-color-subdued); overflow: hidden; text-overflow: ellipsis;
             white-space: nowrap; }
.remove-btn { min-width: 0 !important; }
.key-settings { border: 2px solid var(--color-accent-soft); border-radius: 10px; }
.key-field input { font-size: 1.25em !important; font-weight: 600; }
.scale-readout { padding: 10px; }
.field-invalid { box-shadow: inset 0 0 0 2px #dc2626 !important; border-radius: 6px; }
.field-invalid .info-text { color: #b91c1c !important; font-weight: 600; }
.progress-card { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 10px 14px; }
.progress-head { display: flex; justify-content: space-between; font-size: 1.05em; margin-bottom: 6px; }
.bar { height: 14px; background: var(--background-fill-secondary); border-radius: 7px; overflow: hidden; }
.bar .fill { height: 100%; background: var(--color-accent); transition: width 0.4s; }
.state-finished .fill { background: #16a34a; }
.state-failed .fill { background: #dc2626; }
.state-stopped .fill, .state-stopping .fill { background: #d97706; }
.state-interrupted .fill { background: #b45309; }
.queue-card { border: 1px dashed var(--border-color-primary); border-radius: 10px; padding: 8px 14px; margin-top: 6px; }
.queue-list { margin: 4px 0 0 1.2em; }
.queue-note { font-size: 0.85em; color: var(--body-text-color-subdued); }
.progress-stats { margin-top: 6px; font-size: 0.92em; color: var(--body-text-color-subdued); }
.where code { word-break: break-all; }
.upscale img { width: 100% !important; height: 100% !important; object-fit: contain; image-rendering: pixelated; }
.facts { display: flex; flex-wrap: wrap; gap: 6px; margin: 6px 0; }
.card-unreadable { border: 2px solid #dc2626 !important; background: #fdecec; }
.unreadable-mark { height: 140px; display: flex; align-items: center; justify-content: center; text-align: center;
                   color: #7f1d1d; font-weight: 600; font-size: 0.85em; padding: 6px; }
.rejected-list { margin: 4px 0 0 1.2em; }
.goto-tab { font-weight: 600; text-decoration: underline; }
"""


def theme() -> gr.themes.Base:
    """System fonts only: the page must not fetch anything from the internet."""
    system = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return gr.themes.Soft(primary_hue="indigo", font=system, font_mono=mono)


def launch_options(service: Service) -> dict:
    """Downloads only from the outputs folder; Gradio refuses uploads over the service's size limit itself."""
    return {"theme": theme(), "css": CSS, "js": page_state.GOTO_TAB_JS, "allowed_paths": [str(service.outputs)],
            "max_file_size": service.limits.max_bytes}


def build_app(service: Service) -> gr.Blocks:
    with gr.Blocks(title="LoRA Trainer") as demo:
        gr.Markdown("# LoRA Trainer\nTeach Stable Diffusion a subject or a style from 30–50 images: "
                    "**1** add images → **2** train → **3** preview → **4** blend → **5** export.",
                    elem_id="app-title")
        with gr.Row(equal_height=True):
            run = gr.Dropdown(service.run_choices(), value=None, allow_custom_value=True, label="Run", scale=2,
                              elem_id="run-name", info=f"A folder under {service.outputs}; type a new name to "
                                                        "start a new run.")
            run_notice = gr.HTML(elem_id="run-notice")
        with gr.Tabs(elem_id="steps"):
            with gr.Tab("1. Dataset", id="dataset"):
                ds = tab_dataset.build(service, run)
            with gr.Tab("2. Train", id="train") as train_tab:
                trigger_line = gr.HTML(page_state.trigger_html(""), elem_id="train-trigger")
                tr = tab_train.build(service, run, ds.trigger)
            with gr.Tab("3. Preview", id="preview") as preview_tab:
                pv = tab_preview.build(service)
            with gr.Tab("4. Blend", id="blend") as blend_tab:
                bl = tab_blend.build(service)
            with gr.Tab("5. Export", id="export") as export_tab:
                ex = tab_export.build(service)
        ds.connect(tr.fields)

        def on_run(name: str):   # the dataset report follows ds.items (app/tab_dataset.py)
            try:
                return page_state.run_notice(service, name), tab_dataset.refresh(service, name)
            except Exception as err:  # noqa: BLE001 - shown inline next to the run box
                return notice(str(err), "error"), {"run": name, "items": []}

        def jobs_signature() -> str:
            o = service.jobs.overview()
            return repr((o.current.run, o.current.state, [q.run for q in o.queue]))

        def on_load(wanted: str):   # the run in the address or this browser's last one (page_state.PICK_JS)
            return gr.update(choices=service.run_choices(), value=page_state.pick_run(service, wanted)), \
                jobs_signature()

        def on_focus():  # each run's state, fresh whenever the picker is opened
            return gr.update(choices=service.run_choices())

        def on_jobs_tick(seen: str, name: str):  # ... and when a run starts, ends or queues (not every step)
            now = jobs_signature()
            if now == seen:
                return gr.skip(), gr.skip(), gr.skip()
            try:
                shown = page_state.run_notice(service, name)
            except Exception:  # noqa: BLE001 - an unusable name keeps its error notice
                shown = gr.skip()
            return now, gr.update(choices=service.run_choices()), shown

        def adapter_lists(*current: str):
            choices = service.adapters()
            paths = {p for _, p in choices}
            newest = choices[0][1] if choices else None
            updates = [gr.update(choices=choices, value=c if c in paths else newest) for c in current]
            return updates[0] if len(updates) == 1 else updates

        def blend_lists(*current: str):
            choices = service.adapters()
            paths = {p for _, p in choices}
            return [gr.update(choices=choices, value=c if c in paths else None) for c in current]

        run.change(on_run, [run], [run_notice, ds.items])
        run.change(None, [run], None, js=page_state.REMEMBER_JS)
        ds.trigger.change(page_state.trigger_html, [ds.trigger], [trigger_line], show_progress="hidden", queue=False)
        jobs_seen = gr.State("")
        demo.load(on_load, [run], [run, jobs_seen], js=page_state.PICK_JS)
        run.focus(on_focus, None, [run], show_progress="hidden", queue=False)
        tr.timer.tick(on_jobs_tick, [jobs_seen, run], [jobs_seen, run, run_notice], show_progress="hidden",
                      queue=False)
        train_tab.select(None, None, None, js=FOLLOW_LOG_JS)
        preview_tab.select(adapter_lists, [pv.adapter], [pv.adapter], show_progress="hidden")
        export_tab.select(adapter_lists, [ex.adapter], [ex.adapter], show_progress="hidden")
        blend_tab.select(blend_lists, bl.adapters, bl.adapters, show_progress="hidden")
    return demo
