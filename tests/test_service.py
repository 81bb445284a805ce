"""The web UI's service layer: the form <-> TrainConfig mapping, presets, renderer caching, blending and export
(run folders and datasets: test_service_dataset.py; jobs and the queue: test_service_jobs.py; trainer
processes, reattaching and resuming: test_service_process.py). Fake trainers/renderers keep most tests
instant; one test runs the real trainer on the built-in model for a couple of steps.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from app.service import ConfigError, Service, TrainerError, config_fields
from tests.service_helpers import make_dataset
from trainer.config import TrainConfig, field_names


# --- settings form ---------------------------------------------------------------------------
def test_form_fields_cover_the_config():
    specs = {s.name: s for s in config_fields()}
    assert set(specs) == set(field_names()) - {"version", "data_dir", "output_dir"}
    assert specs["rank"].kind == "int" and specs["alpha"].kind == "float"
    assert specs["train_unet"].kind == "bool" and specs["sample_prompts"].kind == "list"
    assert specs["lr_scheduler"].kind == "choice" and "cosine" in specs["lr_scheduler"].choices
    assert "scale = alpha / r" in specs["alpha"].help and specs["alpha"].section == "network"


def test_validation_is_per_field(service):
    form = service.default_form()
    assert service.validate_form(form) == {}
    errors = service.validate_form({**form, "rank": 0, "learning_rate": None, "epochs": "many",
                                    "model": "/no/such/model.safetensors"})
    assert set(errors) == {"rank", "learning_rate", "epochs", "model"}
    assert "16 is a good start" in errors["rank"] and "empty" in errors["learning_rate"]
    with pytest.raises(ConfigError) as err:
        service.build_config("r", {**form, "rank": 0})
    assert err.value.errors["rank"]


def test_build_config_sets_the_run_folders_and_splits_prompts_by_line(service):
    form = {**service.default_form(), "sample_prompts": "zkw, a disc\nzkw, a ring\n", "max_train_steps": 5.0}
    cfg = service.build_config("r", form)
    assert cfg.sample_prompts == ["zkw, a disc", "zkw, a ring"]
    assert cfg.max_train_steps == 5 and cfg.output_dir == str(service.outputs / "r")
    assert cfg.data_dir == str(service.outputs / "r" / "dataset")


def test_preset_fills_every_field_but_keeps_identity(service):
    current = {**service.default_form(), "name": "mine", "trigger_word": "zkw", "rank": 99, "noise_offset": 0.3}
    values = service.preset_form("quick", current)
    assert set(values) == set(current)
    assert values["rank"] == 8 and values["max_train_steps"] == 300
    assert values["noise_offset"] == TrainConfig().noise_offset     # reset: the preset is silent on it
    assert values["name"] == "mine" and values["trigger_word"] == "zkw"


def test_save_preset_round_trips(service):
    form = {**service.default_form(), "rank": 24, "alpha": 12.0}
    path = service.save_preset(form, "my-preset", "rank 24")
    assert path.parent == service.presets_dir
    assert service.presets()["my-preset"] == "rank 24"
    assert service.preset_form("my-preset")["rank"] == 24
    with pytest.raises(TrainerError, match="not usable"):
        service.save_preset(form, "bad/name")


def test_target_groups_leave_a_seam_for_projectors(service):
    groups = {f: available for _, f, _, available in service.target_groups()}
    assert groups["train_unet"] and groups["train_text_encoder"]
    assert groups["train_projector"] == ("train_projector" in field_names())


def test_saved_form_reads_the_run_config(service):
    cfg = TrainConfig(rank=12, trigger_word="zkw")
    (service.outputs / "r").mkdir()
    cfg.save(service.outputs / "r" / "config.json")
    assert service.saved_form("r")["rank"] == 12 and service.saved_form("r")["trigger_word"] == "zkw"
    assert service.saved_form("other") is None


# --- rendering (fake renderer) ---------------------------------------------------------------
class FakeRenderer:
    def __init__(self, model):
        self.model, self.calls, self.detached, self.settings = model, [], [], []

    def render(self, settings, loras):
        self.calls.append((settings.seed, dict(loras)))
        self.settings.append(settings)
        return Image.new("RGB", (8, 8), (int(50 * sum(loras.values())) % 256, 0, 0))

    def detach(self, path):
        self.detached.append(str(path))


def test_strength_changes_do_not_reload_the_model(tmp_path):
    loads = []
    svc = Service(tmp_path / "out", renderer_factory=lambda m: loads.append(m) or FakeRenderer(m))
    lora = svc.outputs / "a.safetensors"
    lora.write_bytes(b"x")
    base, adapted = svc.compare("builtin", str(lora), 1.0, prompt="p", seed=3)
    grid = svc.sweep("builtin", str(lora), [0, 0.5, 1], prompt="p", seed=3)
    assert loads == ["builtin"] and svc.model_loads == 1
    assert [label for _, label in grid] == ["strength 0", "strength 0.5", "strength 1"]
    renderer = svc._renderers["builtin"].renderer
    assert [w for _, w in renderer.calls] == [{str(lora): 0.0}, {str(lora): 1.0}, {str(lora): 0.0},
                                              {str(lora): 0.5}, {str(lora): 1.0}]
    with pytest.raises(TrainerError, match="prompt is empty"):
        svc.render("builtin", {}, prompt="  ")
    with pytest.raises(TrainerError, match="does not exist"):
        svc.compare("builtin", str(svc.outputs / "missing.safetensors"), 1.0, prompt="p")


def test_a_rewritten_adapter_is_reattached(tmp_path):
    svc = Service(tmp_path / "out", renderer_factory=FakeRenderer)
    lora = svc.outputs / "a.safetensors"
    lora.write_bytes(b"x")
    svc.render("builtin", {str(lora): 1.0}, prompt="p")
    later = time.time() + 5
    import os
    os.utime(lora, (later, later))
    svc.render("builtin", {str(lora): 1.0}, prompt="p")
    assert svc._renderers["builtin"].renderer.detached == [str(lora)]


def test_preview_encodes_prompts_as_the_first_adapters_run_did(tmp_path):
    svc = Service(tmp_path / "out", renderer_factory=FakeRenderer)
    adapters = {}
    for run, text in (("long", {"clip_skip": 2, "max_token_length": 150}), ("plain", {})):
        (svc.outputs / run).mkdir(parents=True)
        TrainConfig(output_dir=str(svc.outputs / run), **text).save(svc.outputs / run / "config.json")
        adapters[run] = svc.outputs / run / "lora.safetensors"
        adapters[run].write_bytes(b"x")
    uploaded = svc.outputs / "_imported" / "other.safetensors"    # no run folder: the defaults
    uploaded.parent.mkdir()
    uploaded.write_bytes(b"x")
    long, plain = str(adapters["long"]), str(adapters["plain"])

    svc.compare("builtin", long, 1.0, prompt="p")                  # the base image too: only the adapter differs
    svc.sweep("builtin", long, [0.5], prompt="p")
    svc.render("builtin", {long: 0.5, plain: 0.5}, prompt="p")     # a blend: the first adapter's run decides
    svc.render("builtin", {plain: 0.5, long: 0.5}, prompt="p")
    svc.render("builtin", {str(uploaded): 1.0}, prompt="p")
    svc.render("builtin", {}, prompt="p")
    seen = [(s.clip_skip, s.max_token_length) for s in svc._renderers["builtin"].renderer.settings]
    assert seen == [(2, 150)] * 4 + [(0, 75)] * 3


def test_adapter_list_skips_datasets_and_diffusers_copies(service):
    for rel in ("r/lora.safetensors", "r/lora-diffusers.safetensors", "r/dataset/x.safetensors",
                "_blends/mix.safetensors"):
        (service.outputs / rel).parent.mkdir(parents=True, exist_ok=True)
        (service.outputs / rel).write_bytes(b"x")
    assert sorted(label for label, _ in service.adapters()) == ["_blends/mix.safetensors", "r/lora.safetensors"]
    assert service.runs() == ["r"]


def test_uploaded_non_lora_is_rejected(service, tmp_path):
    from safetensors.torch import save_file
    import torch

    bad = tmp_path / "model.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(TrainerError, match="not a LoRA"):
        service.import_adapter(str(bad))
    assert not (service.outputs / "_imported" / "model.safetensors").exists()
    with pytest.raises(TrainerError, match="not a .safetensors"):
        service.import_adapter(str(tmp_path / "x.ckpt"))


# --- the real trainer, end to end (a few seconds of CPU with the built-in model) --------------
def test_real_training_preview_blend_and_export(service, tmp_path):
    service.add_files("real", sorted(make_dataset(tmp_path / "src", n=4, size=64).iterdir()))
    form = {**service.preset_form("quick"), "max_train_steps": 2, "batch_size": 1, "trigger_word": "zkw"}
    service.start_training("real", form)
    snap = service.jobs.wait(300)
    assert snap.state == "finished", snap.error
    adapter = snap.result
    assert Path(adapter) == service.outputs / "real" / "lora.safetensors"
    assert [p for _, p in service.adapters()] == [adapter]
    assert service.suggest_prompt(adapter) == "zkw"

    settings = dict(prompt="zkw, a disc", seed=1, steps=2, guidance=5.0)
    base, adapted = service.compare("builtin", adapter, 1.0, **settings)
    weaker = service.render("builtin", {adapter: 0.0}, **settings)
    assert base.tobytes() == weaker.tobytes()          # strength 0 is the base model, exactly
    assert base.tobytes() != adapted.tobytes()
    assert service.model_loads == 1

    blend, summary = service.save_blend([(adapter, 0.5), (adapter, 0.5)], "half-half")
    assert "relative error 0" in summary
    info = service.adapter_info(blend)
    assert info["modules"] > 0 and Path(info["path"]).name == "half-half.safetensors"
    with pytest.raises(TrainerError, match="at least two"):
        service.save_blend([(adapter, 1.0)], "solo")

    assert service.export(adapter, "kohya") == adapter
    diffusers = service.export(adapter, "diffusers")
    assert diffusers.endswith("lora-diffusers.safetensors") and service.model_loads == 1
    from safetensors import safe_open
    with safe_open(diffusers, "pt") as f:
        assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in f.keys())
        assert json.loads(f.metadata()["lora_adapter_metadata"])


# --- boundaries --------------------------------------------------------------------------------
def test_only_the_service_imports_the_trainer():
    """app/ reaches trainer (and so torch/diffusers/peft) only through app/service.py (and the modules it is
    composed from: runs, settings, rendering, exporting, and runner, which reads the records a run writes)."""
    import ast
    import sys

    root = Path(__file__).resolve().parent.parent
    allowed = set(sys.stdlib_module_names) | {"gradio", "PIL", "pandas", "app"}
    for path in sorted((root / "app").glob("*.py")) + [root / "launch.py"]:
        if path.name in ("service.py", "runs.py", "settings.py", "rendering.py", "exporting.py", "runner.py",
                         "sandbox.py", "uploads.py",   # the service's path and upload rules
                         "dataset_state.py", "captioning.py", "preflight.py",   # more of the service's mixins
                         "entry.py"):                  # the `lora-trainer` command: `ui` here, the rest trainer.cli
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_launch_flags():
    from app.launcher import build_parser, parse_auth

    args = build_parser().parse_args([])
    assert (args.port, args.listen, args.share, args.model, args.outputs) == (7860, False, False, "builtin", "outputs")
    args = build_parser().parse_args(["--port", "9000", "--listen", "--auth", "me:pw:x", "--model", "/m.safetensors",
                                      "--outputs", "/tmp/o", "--share"])
    assert args.port == 9000 and args.listen and args.share and args.outputs == "/tmp/o"
    assert parse_auth(args.auth) == ("me", "pw:x") and parse_auth(None) is None
    with pytest.raises(SystemExit):
        parse_auth("nopassword")
