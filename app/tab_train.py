"""Step 2, Train: a form generated from TrainConfig (presets fill every field), Start (or queue) / Stop /
Resume, the queue, and live progress (bar, loss chart, samples, log) polled from the service, so a reload or a
restarted UI reattaches (the run panel: app/train_panel.py; drawing: app/train_view.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from app.common import guard, label, notice
from app.effect_view import train_panel
from app.page_state import refusal_html
from app.service import FieldSpec, Service, TrainerError
from app.estimate_view import Preflight
from app.train_panel import Panel, run_panel, wire_progress

# Fields shown up front, in this order; every other field goes to the Advanced accordion by section.
ESSENTIALS = ("rank", "alpha", "learning_rate", "text_encoder_lr", "max_train_steps", "epochs", "batch_size",
              "resolution", "seed")
MODEL_SOURCES = ("Built-in demo model", "Local file or folder", "Hugging Face hub id")


@dataclass
class TrainTab:
    fields: dict[str, gr.components.Component]    # TrainConfig field -> input (trigger_word is external)
    names: list[str]                              # field order of ``inputs`` after the run box
    progress: gr.HTML
    timer: gr.Timer
    preset: gr.Dropdown


@dataclass
class _Form:
    """The settings inputs as they are built: TrainConfig field -> component, and each one's own info line and
    classes (so a validation error can take the info line's place and be cleared again). ``finish`` fixes
    ``names``/``inputs``, the field order every event uses (trigger_word's input is the Dataset tab's)."""

    specs: dict[str, FieldSpec]
    start_values: dict[str, Any]
    trigger: gr.Textbox
    fields: dict[str, gr.components.Component] = field(default_factory=dict)
    look: dict[str, tuple[str | None, list[str]]] = field(default_factory=dict)  # field -> (info, classes)
    names: list[str] = field(default_factory=list)
    inputs: list[gr.components.Component] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.look["trigger_word"] = (self.trigger.info, [])

    def make(self, name: str, **extra: Any) -> gr.components.Component:
        self.fields[name] = _component(self.specs[name], self.start_values[name], **extra)
        self.look[name] = (extra.get("info", self.specs[name].help or None), list(extra.get("elem_classes", [])))
        return self.fields[name]

    def styled(self, name: str, error: str | None = None) -> dict:
        """A field's info line and classes: its help, or the validation error in red."""
        info, classes = self.look[name]
        if error:
            return gr.update(info=f"⚠ {error}", elem_classes=[*classes, "field-invalid"])
        return gr.update(info=info, elem_classes=classes)

    def finish(self) -> None:
        self.names = [n for n in self.specs if n in self.fields or n == "trigger_word"]
        self.inputs = [self.fields[n] if n != "trigger_word" else self.trigger for n in self.names]

    def as_values(self, values: tuple) -> dict[str, Any]:
        return dict(zip(self.names, values))

    def fill(self, values: dict[str, Any] | None) -> list[Any]:
        if values is None:
            return [gr.skip()] * len(self.names)
        return [{**self.styled(n), "value": values[n]} if n in values else gr.skip() for n in self.names]


def _component(spec: FieldSpec, value: Any, **extra: Any) -> gr.components.Component:
    """The input for one TrainConfig field, chosen by its type (``value`` is a form value)."""
    kw = dict(label=label(spec.name), info=spec.help or None, elem_id=f"field-{spec.name}")
    kw.update(extra)
    if spec.kind == "bool":
        return gr.Checkbox(value=value, **kw)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), value=value, **kw)
    if spec.kind == "int":
        return gr.Number(value=value, precision=0, **kw)
    if spec.kind == "float":
        return gr.Number(value=value, **kw)
    if spec.kind == "list":
        return gr.Textbox(value=value, lines=2, max_lines=8, **kw)
    return gr.Textbox(value=value, **kw)


def _model_source(model: str) -> str:
    if not model or model == "builtin":
        return MODEL_SOURCES[0]
    if model.startswith(("/", ".", "~")) or "\\" in model or model.endswith((".safetensors", ".ckpt")):
        return MODEL_SOURCES[1]
    return MODEL_SOURCES[2]


def _scale_html(rank: Any, alpha: Any) -> str:
    try:
        value = f"<b>{float(alpha) / float(rank):.3g}</b>"
    except (TypeError, ValueError, ZeroDivisionError):
        value = "–"
    return (f'<div class="scale-readout">LoRA scale = alpha / rank = {value}<br><small>rank sets capacity '
            "(16-32 typical); alpha/rank sets strength (0.5 common)</small></div>")


def build(service: Service, run: gr.Dropdown, trigger: gr.Textbox) -> TrainTab:
    specs = {s.name: s for s in service.fields()}
    presets = service.presets()
    first = "quick" if service.default_model == "builtin" and "quick" in presets else None
    form = _Form(specs, service.preset_form(first) if first else service.default_form(), trigger)
    source, preset = _model_and_preset_row(form, presets, first)
    scale = _key_settings(form)
    _targets(form, service.target_groups())
    with gr.Row(equal_height=True):
        form.make("sample_every_n_steps")
        form.make("sample_prompts")
    advanced, advanced_fields = _advanced_settings(form)
    preset_name, preset_desc, save_preset = _save_preset_row()
    panel = run_panel(service.gpu_count())
    train_panel(service, run)          # the effect check's verdict and grid, once the run has one
    form.finish()
    _wire_settings(service, form, run, preset, source, scale)
    _wire_training(service, form, run, advanced, advanced_fields, panel)
    _wire_save_preset(service, form, preset, preset_name, preset_desc, save_preset, panel.notice)
    wire_progress(service, run, panel)
    return TrainTab(fields=form.fields, names=form.names, progress=panel.progress, timer=panel.timer, preset=preset)


def _preset_choices(presets: dict[str, str]) -> list[tuple[str, str]]:
    return [(f"{n} — {d}" if d else n, n) for n, d in presets.items()]


# -- layout ----------------------------------------------------------------------------------
def _model_and_preset_row(form: _Form, presets: dict[str, str], first: str | None) -> tuple[gr.Radio, gr.Dropdown]:
    """Base model (its source, then the box) beside the preset picker and the adapter name."""
    with gr.Row(equal_height=True):
        with gr.Column(scale=3):
            source = gr.Radio(list(MODEL_SOURCES), value=_model_source(form.start_values["model"]),
                              label="Base model", elem_id="model-source")
            form.make("model", show_label=False, info="'builtin', a .safetensors/.ckpt file or diffusers folder "
                      "on this server, or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5 (needs "
                      "internet).")
        with gr.Column(scale=2):
            preset = gr.Dropdown(choices=_preset_choices(presets), value=first,
                                 label="Preset (fills every setting)", elem_id="preset")
            form.make("name")
    return source, preset


def _key_settings(form: _Form) -> gr.HTML:
    """The ESSENTIALS, rank and alpha first with the LoRA scale they give (returned, to follow them)."""
    with gr.Group(elem_classes=["key-settings"]):
        with gr.Row(equal_height=True):
            form.make("rank", elem_classes=["key-field"])
            form.make("alpha", elem_classes=["key-field"])
            scale = gr.HTML(_scale_html(form.start_values["rank"], form.start_values["alpha"]), elem_id="lora-scale")
        with gr.Row(equal_height=True):
            for name in ESSENTIALS[2:5]:
                form.make(name)
        with gr.Row(equal_height=True):
            for name in ESSENTIALS[5:]:
                form.make(name)
    return scale


def _targets(form: _Form, groups: list[tuple[str, str, str, bool]]) -> None:
    """One switch per layer group LoRA can train."""
    gr.Markdown("**What to train**")
    with gr.Row(equal_height=True):
        for text, name, note, available in groups:
            if available:
                form.make(name, label=text, info=note)
            else:  # the seam for layer groups the trainer does not offer yet: visible, honest, inert
                gr.Checkbox(False, label=f"{text} (coming)", info=note, interactive=False,
                            elem_id=f"target-{name}")


def _advanced_settings(form: _Form) -> tuple[gr.Accordion, set[str]]:
    """Every field not shown yet, by section, three to a row; returns the accordion and those fields."""
    shown = set(form.fields) | {"trigger_word"}
    with gr.Accordion("Advanced settings (every option)", open=False, elem_id="advanced") as advanced:
        sections: dict[str, list[str]] = {}
        for name, spec in form.specs.items():
            if name not in shown:
                sections.setdefault(spec.section or "other", []).append(name)
        for section, names in sections.items():
            gr.Markdown(f"**{section.capitalize()}**")
            for start in range(0, len(names), 3):
                with gr.Row(equal_height=True):
                    for name in names[start:start + 3]:
                        form.make(name)
    return advanced, {n for n in form.fields if n not in shown}


def _save_preset_row() -> tuple[gr.Textbox, gr.Textbox, gr.Button]:
    with gr.Accordion("Save these settings as a preset", open=False):
        with gr.Row(equal_height=True):
            preset_name = gr.Textbox(label="Preset name", placeholder="my-style", scale=1)
            preset_desc = gr.Textbox(label="Description", placeholder="what it is for", scale=3)
            save_preset = gr.Button("Save preset", size="sm", scale=1)
    return preset_name, preset_desc, save_preset


def _wire_settings(service: Service, form: _Form, run: gr.Dropdown, preset: gr.Dropdown, source: gr.Radio,
                   scale: gr.HTML) -> None:
    """A preset or the run's saved settings fill the form; the model source and the scale readout follow it."""

    def on_preset(name: str | None, *values):
        if not name:
            return form.fill(None)
        return form.fill(service.preset_form(name, form.as_values(values)))

    def on_run(run_name: str):
        try:
            return form.fill(service.saved_form(run_name))
        except Exception:  # noqa: BLE001 - a run without saved settings keeps the form as it is
            return form.fill(None)

    def on_source(choice: str, model: str):
        if choice == MODEL_SOURCES[0]:
            return gr.update(value="builtin", placeholder=None)
        holder = "/models/v1-5-pruned-emaonly.safetensors" if choice == MODEL_SOURCES[1] else \
            "stable-diffusion-v1-5/stable-diffusion-v1-5"
        return gr.update(value="" if model == "builtin" else model, placeholder=holder)

    fields, inputs = form.fields, form.inputs
    preset.input(on_preset, [preset, *inputs], inputs)
    run.change(on_run, [run], inputs)
    source.input(on_source, [source, fields["model"]], [fields["model"]])
    fields["model"].change(lambda m: _model_source(m), [fields["model"]], [source], show_progress="hidden")
    for comp in (fields["rank"], fields["alpha"]):
        comp.change(_scale_html, [fields["rank"], fields["alpha"]], [scale], show_progress="hidden")


def _wire_training(service: Service, form: _Form, run: gr.Dropdown, advanced: gr.Accordion,
                   advanced_fields: set[str], panel: Panel) -> None:
    """Start or queue (the form is checked first: errors show on their fields, and open Advanced when one is
    there), Stop, Resume, sample/save requests to the running job, and Remove from the queue."""

    preflight = Preflight(service)

    @guard
    def on_start(run_name: str, gpus: int, *values):
        errors = service.validate_form(form.as_values(values))
        updates = [form.styled(n, errors.get(n)) for n in form.names]
        if errors:
            text = "Fix these settings first:\n" + "\n".join(f"{label(k)}: {v}" for k, v in errors.items())
            hidden = any(k in errors for k in advanced_fields)
            return [notice(text, "error"), gr.update(open=True) if hidden else gr.skip(), *updates, gr.skip()]
        go, line = preflight.check(run_name, form.as_values(values))
        if not go:
            return [notice("Not started: this run may not fit in memory (see the estimate under Start). Change a "
                           "setting, or press Start again to train anyway.", "warn"), gr.skip(), *updates, line]
        try:
            config = service.start_training(run_name, form.as_values(values), gpus)
        except TrainerError as err:  # shown inline (and as a toast); raising would mark every field red
            gr.Warning(str(err), title="Not started")
            return [refusal_html(err), gr.skip(), *updates, line]
        ahead = service.jobs.position(run_name)
        if ahead is not None:
            return [notice(f"Queued run '{run_name}', {ahead} ahead: it starts when the run(s) before it end.",
                           "info"), gr.skip(), *updates, line]
        return [notice(f"Started: {config.output_dir}", "ok"), gr.skip(), *updates, line]

    def on_resume(run_name: str, gpus: int):
        try:
            service.resume(run_name, gpus)
        except TrainerError as err:
            return notice(str(err), "error")
        ahead = service.jobs.position(run_name)
        if ahead is not None:
            return notice(f"Queued the resume of '{run_name}', {ahead} ahead.", "info")
        return notice(f"Resuming '{run_name}' from its newest checkpoint.", "ok")

    def on_stop(run_name: str):
        stopped = service.stop(service.job_view(run_name)[0].run)   # the run the page shows
        return notice("Stopping after the current step; a checkpoint and the adapter will still be saved."
                      if stopped else "No training is running.", "warn" if stopped else "info")

    def on_request(what: str):
        def handler():
            ok = service.jobs.request(what)
            return notice(f"{what.capitalize()} requested for the next step." if ok else "No training is running.",
                          "info")
        return handler

    def on_remove(queued: str | None):
        if queued and service.jobs.remove(queued):
            return notice(f"Removed '{queued}' from the queue.", "info")
        return notice(f"'{queued or ''}' is not in the queue (it may have started already).", "warn")

    panel.start.click(on_start, [run, panel.gpus, *form.inputs], [panel.notice, advanced, *form.inputs,
                      panel.estimate], concurrency_id="train-start", concurrency_limit=1)
    panel.estimate_btn.click(lambda run_name, *values: preflight.line(run_name, form.as_values(values)),
                             [run, *form.inputs], [panel.estimate], concurrency_id="estimate", concurrency_limit=1)
    panel.resume.click(on_resume, [run, panel.gpus], [panel.notice], concurrency_id="train-start", concurrency_limit=1)
    panel.stop.click(on_stop, [run], [panel.notice])
    panel.sample_now.click(on_request("sample"), None, [panel.notice])
    panel.save_now.click(on_request("save"), None, [panel.notice])
    panel.queue_remove.click(on_remove, [panel.queue_pick], [panel.notice])


def _wire_save_preset(service: Service, form: _Form, preset: gr.Dropdown, preset_name: gr.Textbox,
                      preset_desc: gr.Textbox, save_preset: gr.Button, form_notice: gr.HTML) -> None:
    """Save the form as a preset, then offer it in the picker."""

    @guard
    def on_save_preset(pname: str, pdesc: str, *values):
        path = service.save_preset(form.as_values(values), pname, pdesc)
        choices = _preset_choices(service.presets())
        return notice(f"Saved preset '{pname.strip()}' to {path}.", "ok"), gr.update(choices=choices,
                                                                                    value=pname.strip())

    save_preset.click(on_save_preset, [preset_name, preset_desc, *form.inputs], [form_notice, preset])
