"""Step 1, Dataset: drop images (+ .txt captions, or a .zip), edit a caption per image, bulk edits, a preview of
the tag shuffle/dropout training applies, report."""
from __future__ import annotations

import functools
import html
from dataclasses import dataclass
from typing import Callable

import gradio as gr

from app import tab_caption
from app.common import guard, notice
from app.service import Service, TrainerError

# No file_types on the drop zone: the browser would refuse other files with a toast that vanishes; the server
# takes what it can and lists the rest, each with why, under "Not added" (app/dataset_state.py).


@dataclass
class DatasetTab:
    items: gr.State          # {"run": str, "items": [(name, path, caption)]}
    report: gr.HTML
    status: gr.HTML
    trigger: gr.Textbox      # the run's trigger word (TrainConfig.trigger_word lives here, next to captions)
    connect: Callable[[dict[str, gr.components.Component]], None]   # wires events to the Train tab's fields


@dataclass
class _Controls:
    """The tab's components that events read or write."""

    upload: gr.File
    trigger: gr.Textbox
    folder: gr.Textbox
    import_btn: gr.Button
    status: gr.HTML
    report: gr.HTML
    prefix_btn: gr.Button
    clear_btn: gr.Button
    find: gr.Textbox
    replace: gr.Textbox
    replace_btn: gr.Button
    preview_btn: gr.Button
    preview: gr.HTML
    draws: gr.State          # preview clicks so far: the seed of the next draw
    items: gr.State
    edits: gr.State          # caption edits so far: each one refreshes the report
    rejected: gr.HTML
    clear_rejected: gr.Button
    captioner: tab_caption.CaptionTools


def refresh(service: Service, run: str) -> dict:
    """The items state of a run (the report follows it: ``items.change``); other parts of the page chain to this."""
    return _state(service, run)


def _state(service: Service, run: str) -> dict:
    """{"run", "items": [(name, path, caption)], "unreadable": {name: reason}}."""
    try:
        return {"run": run, "items": service.dataset_items(run), "unreadable": service.unreadable_images(run)}
    except Exception:  # noqa: BLE001 - an unusable run name shows an empty dataset, the run box says why
        return {"run": run, "items": [], "unreadable": {}}


def _rejected_html(rows: list[tuple[str, str]]) -> str:
    """The files uploads did not add, each with why; kept with the run until cleared."""
    if not rows:
        return ""
    items = "".join(f"<li><b>{html.escape(n)}</b> — {html.escape(why)}</li>" for n, why in rows)
    return (f'<div class="notice notice-warn rejected"><b>Not added ({len(rows)})</b>: these files are not in the '
            f'dataset.<ul class="rejected-list">{items}</ul></div>')


def _report_html(service: Service, run: str, trigger: str = "", resolution: int = 0, model: str = "",
                 caption_extension: str = ".txt") -> str:
    try:
        r = service.dataset_report(run, trigger or "", int(resolution or 0), model, caption_extension or "")
    except Exception as err:  # noqa: BLE001 - the report is advisory; show why it failed instead
        return notice(f"The dataset report failed: {err}", "error")
    if not r.get("num_images") and not r.get("unreadable"):
        return notice(r["text"], "info")
    s = r["sizes"]
    stats = [("images", r["num_images"], not 30 <= r["num_images"] <= 50),
             ("missing captions", len(r["missing_captions"]), bool(r["missing_captions"])),
             ("unreadable", len(r["unreadable"]), bool(r["unreadable"])),
             ("duplicates", len(r["duplicates"]), bool(r["duplicates"])),
             (f"smaller than {r['resolution']} px", len(r["small"]), bool(r["small"]))]
    chips = "".join(f'<span class="stat{" stat-warn" if bad else ""}"><b>{n}</b> {html.escape(what)}</span>'
                    for what, n, bad in stats)
    sizes = (f'<span class="stat">sizes <b>{s.get("min_width")}–{s.get("max_width")}</b> × '
             f'<b>{s.get("min_height")}–{s.get("max_height")}</b> px</span>') if s else ""
    warns = "".join(notice(w, "warn") for w in r.get("warnings", []))
    ok = notice("No problems found: ready to train.", "ok") if not r.get("warnings") else ""
    return (f'<div class="report"><div class="report-title">Dataset report</div>{chips}{sizes}</div>'
            f"{_buckets_html(r)}{warns}{ok}")


def _buckets_html(r: dict) -> str:
    """The report's bucket row: one chip per bucket (a small box of its shape, its size, how many images train
    at it), portrait to landscape, then the mean aspect error with what it means on hover."""
    table = r.get("buckets") or {}
    buckets = list(table.get("buckets", {}).values())
    if not buckets:
        return ""
    repeats = r.get("num_samples", r["num_images"]) != r["num_images"]   # kohya folder repeats count each copy
    longest = max(max(b["resolution"]) for b in buckets)
    chips = ""
    for b in buckets:
        w, h = b["resolution"]
        unit = "per epoch" if repeats else "image" if b["count"] == 1 else "images"
        box = (f'<span style="display:inline-block;width:{18 * w / longest:.0f}px;height:{18 * h / longest:.0f}px;'
               'border:1.5px solid currentColor;border-radius:2px;vertical-align:middle;margin-right:6px"></span>')
        chips += (f'<span class="stat" title="{b["count"]} {unit} train as {w}×{h} px (width × height)">{box}'
                  f'<b>{w}×{h}</b> · {b["count"]} {unit}</span>')
    meaning = ("The average difference between each image's width/height ratio and its bucket's; that much is "
               "cropped off. 0 = every image fits its bucket exactly.")
    error = (f'<span class="stat" title="{html.escape(meaning)}">mean aspect error '
             f'<b>{table.get("mean_img_ar_error", 0.0):.3f}</b></span>')
    return (f'<div class="report buckets"><div class="report-title">Buckets (training sizes at {r["resolution"]} px)'
            '</div>'
            f"{chips}{error}</div>")


def build(service: Service, run: gr.Dropdown) -> DatasetTab:
    gr.Markdown("Drop **30–50 images** of your subject or style. A `.txt` caption with the same file name "
                "as an image is matched to it (or write captions below); a `.zip` works too. Everything is "
                "saved in the run folder, so reloading the page loses nothing.")
    upload, trigger, folder, import_btn = _upload_row()
    status = gr.HTML(elem_id="dataset-status")
    with gr.Row(equal_height=False):
        rejected = gr.HTML(elem_id="dataset-rejected")
        clear_rejected = gr.Button("Clear this list", size="sm", visible=False, scale=0, min_width=120,
                                   elem_id="clear-rejected-btn")
    report = gr.HTML(elem_id="dataset-report")
    captioner = tab_caption.build()
    prefix_btn, clear_btn, find, replace, replace_btn = _bulk_edits()
    preview_btn, preview = _tag_tools()
    items = gr.State({"run": "", "items": [], "unreadable": {}})
    edits = gr.State(0)
    _caption_cards(service, items, status, edits)
    ui = _Controls(upload, trigger, folder, import_btn, status, report, prefix_btn, clear_btn, find, replace,
                   replace_btn, preview_btn, preview, gr.State(0), items, edits, rejected, clear_rejected, captioner)
    return DatasetTab(items=items, report=report, status=status, trigger=trigger,
                      connect=functools.partial(_connect, service, run, ui))


# -- layout ----------------------------------------------------------------------------------
def _upload_row() -> tuple[gr.File, gr.Textbox, gr.Textbox, gr.Button]:
    """The drop zone beside the trigger word and the server-folder import."""
    with gr.Row(equal_height=True):
        upload = gr.File(label="Drop images, .txt captions or a .zip here", file_count="multiple",
                         elem_id="dataset-upload", height=150, scale=3)
        with gr.Column(scale=2):
            trigger = gr.Textbox(label="Trigger word", placeholder="e.g. zkw", elem_id="trigger-word",
                                 info="A rare word that calls up your subject. It is put first in every "
                                      "caption when training (and alone when an image has none).")
            with gr.Group():
                folder = gr.Textbox(label="…or import a folder on the server", placeholder="/data/my-images",
                                    elem_id="dataset-folder")
                import_btn = gr.Button("Import folder", size="sm", elem_id="import-btn")
    return upload, trigger, folder, import_btn


def _bulk_edits() -> tuple[gr.Button, gr.Button, gr.Textbox, gr.Textbox, gr.Button]:
    with gr.Accordion("Bulk caption edits", open=False, elem_id="bulk-accordion"):
        with gr.Row(equal_height=True):
            prefix_btn = gr.Button("Write the trigger word into every caption", size="sm")
            clear_btn = gr.Button("Delete all captions", size="sm", variant="stop")
        with gr.Row(equal_height=True):
            find = gr.Textbox(label="Find", scale=2)
            replace = gr.Textbox(label="Replace with", scale=2)
            replace_btn = gr.Button("Replace in all captions", size="sm", scale=1)
    return prefix_btn, clear_btn, find, replace, replace_btn


def _tag_tools() -> tuple[gr.Button, gr.HTML]:
    with gr.Accordion("Tag tools", open=False, elem_id="tag-tools-accordion"):
        gr.Markdown("Training can shuffle the comma-separated tags of each caption and drop some, keeping the "
                    "first *keep tokens* tags (the trigger word) in place. Set **shuffle tags**, **keep tokens** "
                    "and **tag dropout** under *2. Train → Advanced settings → Dataset*; this shows what they do.")
        preview_btn = gr.Button("Preview shuffled captions", size="sm", elem_id="tag-preview-btn")
        preview = gr.HTML(elem_id="tag-preview")
    return preview_btn, preview


def _preview_html(rows: list[tuple[str, str, str]], shuffle: bool, keep: int, dropout: float) -> str:
    """The preview's table: each image's caption as written beside one draw of it, the kept tags in bold."""
    active = shuffle or dropout > 0
    if active:
        head = notice(f"As training would see them with shuffle tags {'on' if shuffle else 'off'}, keep tokens "
                      f"{keep} and tag dropout {dropout:g}; click again for another draw.", "ok")
    else:
        head = notice("Shuffle tags is off and tag dropout is 0, so training uses every caption as written; turn "
                      "them on under 2. Train → Advanced settings → Dataset.", "info")
    body = ""
    for name, written, trained in rows:
        if active:  # a transformed caption is its tags joined with ", " (tags hold no commas)
            tags = trained.split(", ") if trained else []
            shown = ", ".join(f"<b>{html.escape(t)}</b>" if i < keep else html.escape(t) for i, t in enumerate(tags))
        else:
            shown = html.escape(trained)
        body += f"<tr><td>{html.escape(name)}</td><td>{html.escape(written)}</td><td>{shown}</td></tr>"
    return (f"{head}<table><thead><tr><th>Image</th><th>Caption as written</th><th>As training sees it</th></tr>"
            f"</thead><tbody>{body}</tbody></table>")


def _caption_cards(service: Service, items: gr.State, status: gr.HTML, edits: gr.State) -> None:
    """A card per image (picture, name, caption box, Remove), five to a row, drawn again when ``items`` changes;
    an image training cannot decode says so on its card, and one button removes them all."""

    @gr.render(inputs=[items])
    def cards(state: dict):
        run_name, rows, bad = state.get("run", ""), state.get("items", []), state.get("unreadable", {})
        if not rows:
            gr.Markdown("*No images in this run yet.*")
            return
        gr.Markdown(f"**{len(rows)} images.** Edit a caption and click elsewhere (or press Enter) to save it.")
        if bad:
            with gr.Row(equal_height=True):
                gr.HTML(notice(f"{len(bad)} file(s) cannot be read and would stop training (marked below).",
                               "error"))
                purge = gr.Button(f"Remove unreadable files ({len(bad)})", variant="stop", size="sm", scale=0,
                                  min_width=220, elem_id="remove-unreadable-btn")

            def remove_bad():
                names = service.remove_unreadable(run_name)
                return _state(service, run_name), notice(f"Removed {len(names)} unreadable file(s): "
                                                         f"{', '.join(names)}.", "ok")

            purge.click(guard(remove_bad), None, [items, status])
        for start in range(0, len(rows), 5):
            with gr.Row(equal_height=True):
                for name, path, caption in rows[start:start + 5]:
                    broken = bad.get(name)
                    with gr.Column(min_width=150, elem_classes=["caption-card"] + (["card-unreadable"] * bool(broken))):
                        if broken:   # no picture to show: say why instead of a broken-image icon
                            gr.HTML(f'<div class="unreadable-mark">⚠ cannot be read: {html.escape(broken)}</div>',
                                    key=f"bad-{name}")
                        else:
                            gr.Image(path, show_label=False, height=140, interactive=False, buttons=[],
                                     container=False, key=f"img-{name}")
                        gr.HTML(f'<div class="file-name">{html.escape(name)}</div>', key=f"name-{name}")
                        box = gr.Textbox(caption, show_label=False, lines=2, max_lines=6, key=f"cap-{name}",
                                         placeholder="no caption (the trigger word is used)",
                                         elem_classes=["caption-box"], interactive=True)
                        remove = gr.Button("Remove", size="sm", elem_classes=["remove-btn"], key=f"rm-{name}")

                        def save(text: str, count: int, _name: str = name):
                            service.set_caption(run_name, _name, text)
                            return notice(f"Saved the caption of {_name}.", "ok"), count + 1

                        def drop(_name: str = name):
                            service.remove_image(run_name, _name)
                            return _state(service, run_name), notice(f"Removed {_name}.", "ok")

                        box.blur(guard(save), [box, edits], [status, edits], show_progress="hidden")
                        box.submit(guard(save), [box, edits], [status, edits], show_progress="hidden")
                        remove.click(guard(drop), None, [items, status])
                for pad in range(5 - len(rows[start:start + 5])):  # keep the last row's cards card-sized
                    gr.Column(min_width=150, key=f"pad-{pad}")


# -- wiring ----------------------------------------------------------------------------------
def _connect(service: Service, run: gr.Dropdown, ui: _Controls, fields: dict[str, gr.components.Component]) -> None:
    """``fields`` = the Train tab's TrainConfig inputs: the report checks sizes against resolution and model and
    reads caption_extension files; the tag preview follows shuffle_tags, keep_tokens and tag_dropout."""
    ctx = [run, ui.trigger, fields["resolution"], fields["model"], fields["caption_extension"]]
    outs = [ui.status, ui.items]          # the report and the 'Not added' list follow ui.items

    @guard
    def on_upload(files: list[str] | None, run_name: str):
        note = service.add_files(run_name, files or [])
        return None, notice(note, "warn" if "not added" in note else "ok"), _state(service, run_name)

    @guard
    def on_import(path: str, run_name: str):
        note = service.import_folder(run_name, path)
        return notice(note, "warn" if "not added" in note else "ok"), _state(service, run_name)

    def bulk(action: str):
        @guard
        def handler(run_name: str, trig: str, a: str = "", b: str = ""):
            if action == "prefix":
                msg = f"Put '{trig.strip()}' first in {service.bulk_prefix(run_name, trig)} caption(s)."
            elif action == "replace":
                msg = f"Replaced '{a}' in {service.bulk_replace(run_name, a, b)} caption(s)."
            else:
                msg = f"Deleted {service.bulk_clear(run_name)} caption file(s)."
            return notice(msg, "ok"), _state(service, run_name)
        return handler

    def on_report(run_name: str, trig: str, res, model: str, ext: str):
        return _report_html(service, run_name, trig, res, model, ext)

    def on_dataset(run_name: str, trig: str, res, model: str, ext: str):   # after every change of the dataset
        try:
            rows = service.rejected_files(run_name)
        except Exception:  # noqa: BLE001 - an unusable run name: the run box says why
            rows = []
        return (_report_html(service, run_name, trig, res, model, ext), _rejected_html(rows),
                gr.update(visible=bool(rows)))

    def on_clear_rejected(run_name: str):
        service.clear_rejected(run_name)
        return "", gr.update(visible=False)

    def on_run(run_name: str):   # the run's own settings, as last typed
        try:
            saved = service.dataset_settings(run_name)
        except Exception:  # noqa: BLE001 - an unusable run name: the run box says why
            saved = {}
        return [saved.get(k, "") for k in ("trigger_word", "import_folder", "caption_model")]

    def keep(key: str):
        def handler(run_name: str, value: str):
            try:
                service.save_dataset_setting(run_name, key, value)
            except TrainerError:   # no usable run name yet: the run box says why
                pass
        return handler

    @guard
    def on_preview(draws: int, run_name: str, trig: str, ext: str, shuffle: bool, keep, dropout):
        try:
            rows = service.preview_captions(run_name, shuffle, keep, dropout, seed=draws, trigger_word=trig or "",
                                            caption_extension=ext or "")
        except TrainerError as err:  # shown where the preview goes, next to the settings it names
            return draws, notice(str(err), "error")
        return draws + 1, _preview_html(rows, bool(shuffle), int(keep), float(dropout))

    ui.upload.upload(on_upload, [ui.upload, run], [ui.upload, *outs])
    ui.import_btn.click(on_import, [ui.folder, run], outs)
    ui.prefix_btn.click(bulk("prefix"), [run, ui.trigger], outs)
    ui.replace_btn.click(bulk("replace"), [run, ui.trigger, ui.find, ui.replace], outs)
    ui.clear_btn.click(bulk("clear"), [run, ui.trigger], outs)
    ui.items.change(on_dataset, ctx, [ui.report, ui.rejected, ui.clear_rejected], show_progress="hidden")
    ui.edits.change(on_report, ctx, [ui.report], show_progress="hidden")
    ui.clear_rejected.click(on_clear_rejected, [run], [ui.rejected, ui.clear_rejected])
    run.change(on_run, [run], [ui.trigger, ui.folder, ui.captioner.model]).then(
        on_report, ctx, [ui.report], show_progress="hidden")
    for key, box in (("trigger_word", ui.trigger), ("import_folder", ui.folder), ("caption_model", ui.captioner.model)):
        box.change(keep(key), [run, box], None, show_progress="hidden", queue=False)   # typed, or loaded
    tab_caption.connect(service, ui.captioner, run, fields["caption_extension"], ui.trigger, outs,
                        functools.partial(_state, service))
    ui.trigger.blur(on_report, ctx, [ui.report], show_progress="hidden")
    fields["caption_extension"].blur(on_report, ctx, [ui.report], show_progress="hidden")
    tools = [fields["shuffle_tags"], fields["keep_tokens"], fields["tag_dropout"]]
    ui.preview_btn.click(on_preview, [ui.draws, run, ui.trigger, fields["caption_extension"], *tools],
                         [ui.draws, ui.preview])
