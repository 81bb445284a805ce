"""The settings form: TrainConfig fields as form specs, form values <-> TrainConfig, per-field validation,
presets, and the settings a run last trained with.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import config as tconfig
from trainer.errors import ConfigError, TrainerError

MANAGED_FIELDS = ("version", "data_dir", "output_dir")     # set by the service, never shown
KEEP_ON_PRESET = ("model", "name", "trigger_word", "sample_prompts")  # a preset without them keeps the user's
TARGET_GROUPS = (  # (label, TrainConfig switch, note); a switch the config lacks is shown as "coming"
    ("UNet cross-attention", "train_unet", "attn2 q/k/v/out: the usual LoRA target"),
    ("Text encoder(s)", "train_text_encoder", "self-attention of CLIP; learns new words faster"),
    ("Projector layers", "train_projector", "encoder_hid_proj / add_embedding / text_projection, the ones the "
     "model has; tools that don't know these modules skip them (Advanced: export_portable leaves them out)"),
)


@dataclass(frozen=True)
class FieldSpec:
    """One TrainConfig field as a form needs it."""

    name: str
    kind: str                       # bool / int / float / str / choice / list
    default: Any
    choices: tuple[str, ...] = ()
    help: str = ""
    section: str = ""


def config_fields() -> list[FieldSpec]:
    """Every user-facing TrainConfig field, in declaration order, with the help, section and choices its
    metadata carries."""
    specs = []
    for f in dataclasses.fields(tconfig.TrainConfig):
        if f.name in MANAGED_FIELDS:
            continue
        default = getattr(tconfig.TrainConfig(), f.name)
        section, help_, choices = tconfig.field_info(f.name)
        kind = ("choice" if choices else "bool" if isinstance(default, bool) else "int" if isinstance(default, int)
                else "float" if isinstance(default, float) else "list" if isinstance(default, list) else "str")
        specs.append(FieldSpec(f.name, kind, default, choices, help_, section))
    return specs


def to_form(config: "tconfig.TrainConfig") -> dict[str, Any]:
    """TrainConfig -> {field: form value}; lists become one item per line."""
    values = config.to_dict()
    return {k: "\n".join(map(str, v)) if isinstance(v, list) else v
            for k, v in values.items() if k not in MANAGED_FIELDS}


def _from_form(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Form values -> (config overlay, per-field conversion errors)."""
    known, errors, overlay = set(tconfig.field_names()), {}, {}
    defaults = tconfig.TrainConfig().to_dict()
    for k, v in values.items():
        if k not in known or k in MANAGED_FIELDS:
            continue
        if v is None or (isinstance(v, str) and not v.strip() and not isinstance(defaults[k], (str, list))):
            errors[k] = "is empty; enter a value."
            continue
        if isinstance(defaults[k], list) and isinstance(v, str):
            v = [line.strip() for line in v.splitlines() if line.strip()]
        try:
            tconfig.from_dict({k: v})
            overlay[k] = v
        except ConfigError as err:
            errors.update(err.errors)
    return overlay, errors

class SettingsMixin:
    """The form <-> TrainConfig mapping and presets. State: ``default_model`` (the form's starting model) and
    ``presets_dir``; ``run_dir`` (RunsMixin) places a run's data and output folders."""

    default_model: str
    presets_dir: Path
    sandbox: Any                      # app.sandbox.Sandbox: which base models the UI may load

    def fields(self) -> list[FieldSpec]:
        return config_fields()

    def target_groups(self) -> list[tuple[str, str, str, bool]]:
        """(label, config field, note, available) for each group of layers LoRA can train."""
        names = set(tconfig.field_names())
        return [(label, f, note, f in names) for label, f, note in TARGET_GROUPS]

    def default_form(self) -> dict[str, Any]:
        return to_form(tconfig.TrainConfig(model=self.default_model))

    def presets(self) -> dict[str, str]:
        return tconfig.list_presets(self.presets_dir)

    def preset_form(self, name: str, current: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every field as the preset sets it (defaults where it is silent; identity fields kept)."""
        overlay = tconfig.load_preset(tconfig.check_preset_name(str(name or "")), self.presets_dir, allow_path=False)
        values = to_form(tconfig.from_dict(overlay, tconfig.TrainConfig(model=self.default_model)))
        for k in KEEP_ON_PRESET:
            if current and k in current and k not in overlay:
                values[k] = current[k]
        return values

    def validate_form(self, values: dict[str, Any]) -> dict[str, str]:
        """{field: message} for the form as typed (empty when it would train)."""
        overlay, errors = _from_form(values)
        config = tconfig.from_dict(overlay, tconfig.TrainConfig(model=self.default_model))
        errors.update({k: v for k, v in config.validate().items() if k not in errors})
        if "model" not in errors:
            try:
                self.sandbox.model(str(config.model))     # under a model root; a hub id needs --allow-downloads
            except TrainerError as err:
                errors["model"] = str(err)
        return errors

    def build_config(self, run: str, values: dict[str, Any]) -> "tconfig.TrainConfig":
        errors = self.validate_form(values)
        if errors:
            raise ConfigError(errors)
        overlay, _ = _from_form(values)
        run_dir = self.run_dir(run)
        overlay.update(data_dir=str(run_dir / "dataset"), output_dir=str(run_dir))
        return tconfig.from_dict(overlay, tconfig.TrainConfig(model=self.default_model)).check()

    def saved_form(self, run: str) -> dict[str, Any] | None:
        """The settings of the run's last training (its config.json), if any, with the trigger word as last
        typed on the Dataset tab (``dataset_settings``)."""
        try:
            path = self.run_dir(run) / "config.json"
            if not path.is_file():
                return None
            values = to_form(tconfig.from_dict(json.loads(path.read_text(encoding="utf-8"))))
            values["trigger_word"] = self.dataset_settings(run).get("trigger_word", values["trigger_word"])
            return values
        except (TrainerError, OSError, ValueError):
            return None

    def save_preset(self, values: dict[str, Any], name: str, description: str = "") -> Path:
        overlay, errors = _from_form(values)
        if errors:
            raise ConfigError(errors)
        config = tconfig.from_dict(overlay)
        return tconfig.save_preset(config, name.strip(), description.strip(), self.presets_dir)
