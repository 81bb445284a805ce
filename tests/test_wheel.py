"""A non-editable install works anywhere: the wheel built from this checkout, installed into a fresh venv
(``--system-site-packages`` reuses torch and the other dependencies; the project itself comes from the wheel), runs
``lora-trainer presets``, a 3-step train and the web UI from a folder outside the checkout."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

from tests.service_helpers import make_dataset
from tests.test_launch import free_port

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list, cwd: Path, env: dict, timeout: int = 600) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_wheel_installs_into_a_fresh_venv_and_trains_from_another_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1", PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    src = tmp_path / "src"                         # a clean copy of the sources: no build/ or egg-info left here
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "outputs", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".hypothesis", "tests", "bench"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
        tmp_path, env)
    wheel = next((tmp_path / "dist").glob("lora_trainer-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"trainer/presets/quick.toml", "trainer/presets/sdxl-character.toml", "app/launcher.py",
            "app/__main__.py", "trainer/assets/builtin/unet/config.json"} <= set(names)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp_path, env)
    py, cli = venv / "bin" / "python", venv / "bin" / "lora-trainer"
    run([py, "-m", "pip", "install", "--no-deps", wheel], tmp_path, env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([py, "-c", "import trainer, app; print(trainer.__file__); print(app.__file__)"], work, env).split()
    assert all(Path(p).is_relative_to(venv) for p in where), where      # not the checkout, not an editable path

    listed = run([cli, "presets"], work, env)
    assert "quick" in listed and "sd15-character" in listed
    make_dataset(work / "data", n=4, size=64)
    out = run([cli, "train", "--data", "data", "--out", "run", "--preset", "quick", "--steps", "3",
               "--batch-size", "1", "--quiet", "--no-effect-check"], work, env)
    adapter = (work / out.strip().splitlines()[-1]).resolve()        # printed as given: relative to the cwd
    assert adapter.is_file() and adapter.is_relative_to((work / "run").resolve()) and adapter.suffix == ".safetensors"
    assert "--auth-file FILE" in run([py, "-m", "app", "--help"], work, env)

    port = free_port()
    ui = subprocess.Popen([str(cli), "ui", "--port", str(port), "--outputs", "ui-outputs"], cwd=work, env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(ui.stdout), daemon=True)
    reader.start()
    try:
        end = time.monotonic() + 180
        while not any("LoRA Trainer is running at" in line for line in lines):   # up, its signal handlers set
            assert ui.poll() is None, "".join(lines)
            assert time.monotonic() < end, "the installed UI never started"
            time.sleep(0.5)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30).read()
        assert b"LoRA Trainer" in page
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)
        reader.join(10)
    assert ui.returncode == 128 + signal.SIGTERM, "".join(lines)
    assert (work / "ui-outputs").is_dir() and not list(venv.glob("lib/*/site-packages/presets"))
