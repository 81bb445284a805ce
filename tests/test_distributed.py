"""Several processes, one run: 2 CPU processes (torchrun, gloo) x batch 1 equal 1 process x batch 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
COMMON = ["--data", str(ROOT / "examples" / "zkw"), "--preset", "quick", "--steps", "12", "--train-text-encoder",
          "--set", "save_precision=fp32", "--checkpoint-every", "4", "--quiet", "--no-effect-check"]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "trainer", "train", *args]


def single(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "train", *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def progress(run_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows if r["type"] == "Progress"]


def max_rel_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max(((ta[k] - tb[k]).abs().max() / ta[k].abs().max().clamp_min(1e-12)).item()
               for k in ta if not k.endswith(".alpha"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    run(single(*COMMON, "--batch-size", "2", "--out", str(out)))
    return out


def test_two_processes_equal_one_with_the_global_batch(tmp_path, one_process):
    out = tmp_path / "run"
    done = run(torchrun(*COMMON, "--batch-size", "1", "--out", str(out)))
    assert done.stdout.strip().splitlines() == [str(out / "lora.safetensors")]   # printed once, by rank 0
    assert max_rel_diff(one_process / "lora.safetensors", out / "lora.safetensors") <= 1e-4
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lora.safetensors"]
    a, b = progress(one_process), progress(out)
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(1, 13))
    assert [lr for _, _, lr in a] == [lr for _, _, lr in b]
    assert all(abs(la - lb) <= 1e-4 * max(1.0, abs(la)) for (_, la, _), (_, lb, _) in zip(a, b))
    assert len([line for line in (out / "events.jsonl").read_text().splitlines()
                if '"Finished"' in line]) == 1                                      # one writer


def test_two_process_run_killed_after_a_checkpoint_resumes_on_two(tmp_path, one_process):
    out = tmp_path / "run"
    proc = subprocess.Popen(torchrun(*COMMON, "--batch-size", "1", "--out", str(out)), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    marker = out / "checkpoints" / "step-000004" / "state.json"
    end = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)                                              # launcher and both ranks
    proc.communicate()
    assert json.loads(marker.read_text())["processes"] == 2
    refused = subprocess.run(single("--resume", str(out)), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert refused.returncode == 2 and "written by a run on 2 process(es) and this one has 1" in refused.stderr
    run(torchrun("--resume", str(out)))
    assert max_rel_diff(one_process / "lora.safetensors", out / "lora.safetensors") <= 1e-4
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "lora.safetensors")).values())
