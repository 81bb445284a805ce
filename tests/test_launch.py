"""`python launch.py` and its signals: SIGTERM while a run trains asks the trainer process to checkpoint and
stop, waits for it, says how to resume and exits non-zero. The run is started from a saved queue, as a UI
restarted with runs still queued starts them.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from app.scheduler import QUEUE_FILE
from app.service import Service
from tests.service_helpers import make_dataset
from trainer.config import PRESETS_DIR

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_stops_the_trainer_with_a_checkpoint_and_says_how_to_resume(tmp_path):
    outputs = tmp_path / "outputs"
    svc = Service(outputs, presets_dir=PRESETS_DIR)
    svc.add_files("sig", sorted(make_dataset(tmp_path / "src", n=4, size=64).iterdir()))
    config = svc.build_config("sig", {**svc.preset_form("quick"), "max_train_steps": 5000, "batch_size": 1})
    (outputs / QUEUE_FILE).write_text(json.dumps({"version": 1, "queue": [
        {"run": "sig", "kind": "train", "config": config.to_dict(), "queued": time.time()}]}), encoding="utf-8")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ui = subprocess.Popen([sys.executable, "launch.py", "--port", str(free_port()), "--outputs", str(outputs)],
                          cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    events = outputs / "sig" / "events.jsonl"
    try:
        end = time.monotonic() + 120
        while not (events.is_file() and '"Progress"' in events.read_text()):
            assert ui.poll() is None, ui.communicate()[0]
            assert time.monotonic() < end, "the queued run never started training"
            time.sleep(0.1)
        pid = json.loads((outputs / "sig" / "status.json").read_text())["pid"]
        ui.send_signal(signal.SIGTERM)
        out, _ = ui.communicate(timeout=120)
    finally:
        if ui.poll() is None:
            ui.kill()
    assert ui.returncode == 128 + signal.SIGTERM, out
    status = json.loads((outputs / "sig" / "status.json").read_text())
    assert status["state"] == "stopped" and 0 < status["step"] < 5000, out
    assert (outputs / "sig" / "checkpoints" / f"step-{status['step']:06d}" / "state.json").is_file()
    assert "Started queued run 'sig'" in out
    assert "asking it to write a checkpoint and the adapter; waiting up to 60 s" in out
    assert f"Run 'sig' stopped at step {status['step']}" in out
    assert f"python -m trainer train --resume {outputs / 'sig'}" in out
    assert not Path(f"/proc/{pid}").exists() or b"trainer" not in Path(f"/proc/{pid}/cmdline").read_bytes()
