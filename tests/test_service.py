"""The web UI's service layer: the form <-> TrainConfig mapping, presets, the jobs and their queue (with the
in-thread runner), renderer caching, blending and export (run folders and datasets: test_service_dataset.py;
trainer processes, reattaching and resuming: test_service_process.py). Fake trainers/renderers keep most tests
instant; one test runs the real trainer on the built-in model for a couple of steps.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from app.jobs import ThreadJob
from app.runner import EventTail, pid_alive, read_status
from app.scheduler import QUEUE_FILE, JobBusy, JobQueue, Queued
from app.service import ConfigError, Service, TrainerError, config_fields
from tests.service_helpers import make_dataset
from trainer.events import Control
from trainer.config import TrainConfig, field_names
from trainer.events import Finished, Log, Progress, Saved, Started


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


# --- job manager -----------------------------------------------------------------------------
def fake_train(steps: int = 5, delay: float = 0.01, fail: Exception | None = None, write: bool = True):
    def train(config, listeners, control):
        emit = lambda e: [fn(e) for fn in listeners]  # noqa: E731
        emit(Started(run_dir=config.output_dir, total_steps=steps, trainable_params=10, num_images=3))
        done = 0
        for step in range(1, steps + 1):
            if control.stop_requested:
                break
            if fail and step == 3:
                raise fail
            time.sleep(delay)
            done = step
            emit(Progress(step=step, total_steps=steps, epoch=0, loss=1.0 / step, avg_loss=1.0, lr=1e-4,
                          it_per_s=10.0, eta_s=0.1))
        path = Path(config.output_dir) / "lora.safetensors"
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            emit(Saved(step=done, path=str(path), final=True))
            emit(Finished(path=str(path), steps=done, stopped_early=done < steps, final_loss=0.5, seconds=0.1))
        emit(Log("bye"))
        return path
    return train


def make_jobs(tmp_path, train) -> JobQueue:
    """A JobQueue over ``tmp_path`` whose entries run ``train`` in a thread."""
    def launch(entry, versions):
        config = TrainConfig(output_dir=str(tmp_path / entry.run))
        return ThreadJob(entry.run, config, train, Control, versions, user_errors=(TrainerError,))
    return JobQueue(tmp_path, launch, interval=0.02)


def wait_step(jobs, step: int) -> None:
    deadline = time.monotonic() + 10
    while jobs.snapshot().step < step:
        assert time.monotonic() < deadline, jobs.snapshot()
        time.sleep(0.01)


def test_job_runs_in_background_and_records_history(tmp_path):
    jobs = make_jobs(tmp_path, fake_train(steps=5))
    assert jobs.submit(Queued("r")) is None                      # nothing ahead: started now
    snap = jobs.wait(10)
    assert snap.state == "finished" and snap.step == 5 and not snap.active
    assert [h[0] for h in snap.history] == [1, 2, 3, 4, 5]
    assert snap.result.endswith("lora.safetensors") and any("finished" in line for line in snap.logs)


def test_second_start_is_queued_and_starts_when_the_first_ends(tmp_path):
    jobs = make_jobs(tmp_path, fake_train(steps=1000, delay=0.005))
    jobs.submit(Queued("a"))
    wait_step(jobs, 2)
    assert jobs.submit(Queued("b")) == 1 and jobs.position("b") == 1   # the running one is ahead
    assert jobs.submit(Queued("c")) == 2
    with pytest.raises(JobBusy, match="'a' is already training"):
        jobs.submit(Queued("a"))
    with pytest.raises(JobBusy, match="'b' is already queued"):
        jobs.submit(Queued("b"))
    assert jobs.remove("c") and not jobs.remove("c") and jobs.position("c") is None
    assert [q.run for q in jobs.queued()] == ["b"] and jobs.snapshot().run == "a"
    assert jobs.stop()
    first = jobs.wait(10, run="a")
    assert first.state == "stopped" and 0 < first.step < 1000 and Path(first.result).is_file()
    deadline = time.monotonic() + 10
    while jobs.snapshot().run != "b":                             # the poller starts the next one
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert jobs.queued() == [] and jobs.overview().ahead("b") is None
    assert jobs.last("a") == first and jobs.stop()
    assert jobs.wait(10).state == "stopped"
    assert not jobs.stop()
    assert json.loads((tmp_path / QUEUE_FILE).read_text())["queue"] == []


def test_the_queue_is_kept_on_disk_and_vanished_runs_are_dropped(tmp_path):
    jobs = make_jobs(tmp_path, fake_train(steps=10_000, delay=0.01))
    for run in ("a", "b", "c"):
        (tmp_path / run).mkdir()
        jobs.submit(Queued(run, config={"rank": 4}))
    assert [q.run for q in jobs.queued()] == ["b", "c"]
    (tmp_path / "c").rmdir()
    later = make_jobs(tmp_path, fake_train())                      # a UI restart over the same folder
    assert [(q.run, q.config) for q in later.queued()] == [("b", {"rank": 4})]
    assert any("dropped queued run 'c'" in note for note in later.overview().notes)
    assert [q["run"] for q in json.loads((tmp_path / QUEUE_FILE).read_text())["queue"]] == ["b"]
    end = jobs.shutdown(10)                                        # a quitting UI: stop, start nothing more
    assert end.run == "a" and end.state == "stopped"
    jobs.close()
    jobs.start_polling()
    assert jobs.snapshot().run == "a" and [q.run for q in jobs.queued()] == ["b", "c"]


@pytest.mark.parametrize("fail, expected", [
    (TrainerError("Dataset folder 'x' does not exist; check the path."), "Dataset folder 'x' does not exist"),
    (RuntimeError("boom"), "unexpected error: RuntimeError: boom"),
])
def test_failures_reach_the_snapshot_as_messages(tmp_path, fail, expected):
    jobs = make_jobs(tmp_path, fake_train(fail=fail))
    jobs.submit(Queued("r"))
    snap = jobs.wait(10)
    assert snap.state == "failed" and expected in snap.error


def test_a_run_that_writes_nothing_is_not_reported_as_finished(tmp_path):
    jobs = make_jobs(tmp_path, fake_train(write=False))
    jobs.submit(Queued("r"))
    snap = jobs.wait(10)
    assert snap.state == "failed" and "without writing an adapter" in snap.error


def test_a_run_that_cannot_start_fails_and_the_queue_moves_on(tmp_path):
    def launch(entry, versions):
        if entry.run == "bad":
            raise TrainerError("Base model 'x' cannot be loaded.")
        return ThreadJob(entry.run, TrainConfig(output_dir=str(tmp_path / entry.run)), fake_train(steps=3),
                         Control, versions)
    jobs = JobQueue(tmp_path, launch, interval=0.02)
    jobs.submit(Queued("bad"))
    assert jobs.snapshot().state == "failed" and "could not start: Base model 'x'" in jobs.snapshot().error
    jobs.submit(Queued("good"))
    assert jobs.wait(10).state == "finished" and jobs.snapshot().run == "good"


def test_snapshots_are_consistent_while_training(tmp_path):
    jobs = make_jobs(tmp_path, fake_train(steps=200, delay=0.001))
    jobs.submit(Queued("r"))
    versions = []
    while jobs.snapshot().active:
        s = jobs.snapshot()
        assert len(s.history) == (s.history[-1][0] if s.history else 0)
        versions.append(s.version)
    assert versions == sorted(versions) and len(set(versions)) > 1


def test_start_training_needs_images_and_queues_a_second_run(tmp_path):
    svc = Service(tmp_path / "out", train_fn=fake_train(steps=10_000, delay=0.01))
    with pytest.raises(TrainerError, match="no images yet"):
        svc.start_training("empty", svc.default_form())
    for run in ("a", "b"):
        svc.add_files(run, sorted(make_dataset(tmp_path / "src", n=2).iterdir()))
    svc.start_training("a", svc.default_form())
    with pytest.raises(TrainerError, match="already training"):
        svc.start_training("a", svc.default_form())
    svc.start_training("b", svc.default_form())
    assert svc.jobs.position("b") == 1 and svc.run_state("b") == "queued, 1 ahead"
    assert svc.run_state("a").startswith("training ") and svc.default_run() == "a"
    assert dict((name, label) for label, name in svc.run_choices())["b"] == "b — queued, 1 ahead"
    view, overview = svc.job_view("b")                             # a queued run: the page follows the current one
    assert view.run == "a" and [q.run for q in overview.queue] == ["b"]
    assert svc.jobs.remove("b") and not svc.stop("b") and svc.stop("a")
    assert svc.jobs.wait(10).state == "stopped" and svc.run_state("b") == ""


def test_job_view_of_a_run_that_never_trained_is_idle(tmp_path):
    svc = Service(tmp_path / "out", train_fn=fake_train(steps=3))
    view, overview = svc.job_view("fresh")
    assert (view.state, view.run) == ("idle", "fresh") and not overview.current.active


def test_event_tail_reads_complete_lines_from_its_offset(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []                                       # no file yet
    path.write_text('{"type": "Log", "message": "a"}\n{"type": "Log", "message": "b"}\n{"type": "Lo')
    assert [e["message"] for e in tail.read()] == ["a", "b"] and tail.read() == []   # the cut line waits
    with open(path, "a") as f:
        f.write('g", "message": "c"}\nnot json\n{"type": "Log", "message": "d"}\n')
    assert [e["message"] for e in tail.read()] == ["c", "d"]
    path.write_text('{"type": "Log", "message": "new run"}\n')      # rewritten shorter: from the start
    assert [e["message"] for e in tail.read()] == ["new run"]


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_whose_trainer_died_reads_as_interrupted_and_a_finished_one_is_not_resumed(tmp_path):
    svc = Service(tmp_path / "out", train_fn=fake_train())
    folder = svc.outputs / "cut"
    folder.mkdir()
    TrainConfig(output_dir=str(folder)).save(folder / "config.json")
    events = [{"type": "Started", "run_dir": str(folder), "total_steps": 9, "trainable_params": 1, "num_images": 2}]
    events += [{"type": "Progress", "step": i, "total_steps": 9, "epoch": 0, "loss": 1.0, "avg_loss": 1.0, "lr": 0.1,
                "it_per_s": 1.0, "eta_s": 1.0} for i in (1, 2, 3, 2, 3, 4)]            # resumed once, from step 1
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    status = {"state": "running", "pid": dead_pid(), "step": 3, "total_steps": 9}
    (folder / "status.json").write_text(json.dumps(status))
    assert read_status(folder)["state"] == "interrupted" and not pid_alive(status["pid"])
    view, _ = svc.job_view("cut")
    assert view.state == "interrupted" and view.resumable and [h[0] for h in view.history] == [1, 2, 3, 4]
    assert "no checkpoint yet, so Resume starts it again from step 0" in view.error
    assert svc.run_choices() == [("cut — interrupted at 4", "cut")]
    (folder / "status.json").write_text(json.dumps({**status, "state": "finished", "step": 9}))
    assert svc.run_state("cut") == "finished" and svc.job_view("cut")[0].state == "finished"
    with pytest.raises(TrainerError, match="already finished all its 9 steps"):
        svc.resume("cut")
    with pytest.raises(TrainerError, match="has never trained"):
        svc.resume("other")


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
    lora = tmp_path / "a.safetensors"
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
        svc.compare("builtin", str(tmp_path / "missing.safetensors"), 1.0, prompt="p")


def test_a_rewritten_adapter_is_reattached(tmp_path):
    svc = Service(tmp_path / "out", renderer_factory=FakeRenderer)
    lora = tmp_path / "a.safetensors"
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

    blend = service.save_blend([(adapter, 0.5), (adapter, 0.5)], "half-half")
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
        if path.name in ("service.py", "runs.py", "settings.py", "rendering.py", "exporting.py", "runner.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_launch_flags():
    from launch import build_parser, parse_auth

    args = build_parser().parse_args([])
    assert (args.port, args.listen, args.share, args.model, args.outputs) == (7860, False, False, "builtin", "outputs")
    args = build_parser().parse_args(["--port", "9000", "--listen", "--auth", "me:pw:x", "--model", "/m.safetensors",
                                      "--outputs", "/tmp/o", "--share"])
    assert args.port == 9000 and args.listen and args.share and args.outputs == "/tmp/o"
    assert parse_auth(args.auth) == ("me", "pw:x") and parse_auth(None) is None
    with pytest.raises(SystemExit):
        parse_auth("nopassword")
