"""Measurement: two training jobs at once on one machine. Median step time of a job alone, of two jobs started
together that share the cores (the default: each registers and uses cores / jobs threads), and of two jobs that
each take every core (`--threads <cores>`, what two torch processes do when nothing shares). Built-in model at
128 px, batch 4, so the step is compute-bound.

    python bench/concurrency.py [--steps 60]              # ~5 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.reference import write_images  # noqa: E402


def start(data: Path, out: Path, steps: int, threads: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trainer", "train", "--data", str(data), "--out", str(out), "--steps", str(steps),
           "--resolution", "128", "--batch-size", "4", "--no-buckets", "--quiet", "--no-effect-check"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def median_step(out: Path) -> float:
    stamps = [json.loads(line)["time"] for line in (out / "events.jsonl").read_text().splitlines()
              if '"type": "Progress"' in line]
    return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))


def threads_line(out: Path) -> str:
    return next((json.loads(line)["message"] for line in (out / "events.jsonl").read_text().splitlines()
                 if '"cpu threads' in line), "")


def run(label: str, data: Path, tmp: Path, steps: int, jobs: int, threads: int | None) -> dict:
    outs = [tmp / f"{label}-{i}" for i in range(jobs)]
    procs = [start(data, out, steps, threads) for out in outs]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(p.stderr.read()[-2000:])
    row = {"case": label, "median_step_s": [median_step(o) for o in outs], "threads": [threads_line(o) for o in outs]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    from trainer.loop.threads import physical_cores

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    data = write_images(tmp / "photos")
    cores = physical_cores()
    rows = [run("alone", data, tmp, a.steps, 1, None), run("two, sharing", data, tmp, a.steps, 2, None),
            run(f"two, {cores} threads each", data, tmp, a.steps, 2, cores)]
    solo = rows[0]["median_step_s"][0]
    print("\n| case | median step (s) per job | slowdown vs alone |\n|---|---|---|")
    for r in rows:
        steps = ", ".join(f"{s:.3f}" for s in r["median_step_s"])
        print(f"| {r['case']} | {steps} | {max(r['median_step_s']) / solo:.1f}x |")


if __name__ == "__main__":
    main()
