"""Measurement: which target set makes the quick preset draw the example concept's own colours on the built-in
model (examples/zkw). For each set: trainable parameters, training time, colour share of the concept's colours
(magenta/teal) at strength 1.0 and the colour-histogram distance to the dataset. Results: docs/DEMO_MODEL.md.

    python bench/fidelity.py                      # ~2 min per variant on 2 CPU cores
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from trainer.config import CONV_TARGETS, UNET_TARGET_SETS, resolve  # noqa: E402
from trainer.demo.concept import CONCEPT_COLOURS, TRIGGER  # noqa: E402
from trainer.demo.score import colour_histogram_distance, colour_share  # noqa: E402
from trainer.events import Started  # noqa: E402
from trainer.loop.train import train  # noqa: E402
from trainer.render.generate import Renderer, RenderSettings  # noqa: E402

PROMPT = f"{TRIGGER}, a {TRIGGER} emblem on a white background"
DATA = ROOT / "examples" / TRIGGER
VARIANTS = {   # each on top of the quick preset (which now has conv rank 4)
    "cross-attn (quick before)": {"conv_rank": 0},
    "all linear": {"unet_targets": list(UNET_TARGET_SETS["all"]), "conv_rank": 0},
    "all linear + conv rank 4": {"unet_targets": list(UNET_TARGET_SETS["all"]), "conv_rank": 4, "conv_alpha": 4.0},
    "cross-attn + conv rank 4 (quick now)": {"conv_rank": 4, "conv_alpha": 4.0},
}


def main() -> None:
    assert not set(CONV_TARGETS) & set(UNET_TARGET_SETS["all"])
    dataset = [Image.open(p).convert("RGB") for p in sorted(DATA.glob("*.png"))]
    print("dataset colour share:", round(colour_share(dataset, CONCEPT_COLOURS), 3), flush=True)
    renderer = Renderer.load("builtin")
    rows = []
    for name, overrides in VARIANTS.items():
        out = Path(tempfile.mkdtemp(prefix="fidelity-"))
        config = resolve("quick", {"data_dir": str(DATA), "trigger_word": TRIGGER, "output_dir": str(out),
                                   **overrides})
        started = []
        t0 = time.perf_counter()
        path = train(config, listeners=[lambda e: started.append(e) if isinstance(e, Started) else None])
        seconds = time.perf_counter() - t0
        images = [renderer.render(RenderSettings(PROMPT, seed=s, steps=20, guidance=5.0), {str(path): 1.0})
                  for s in range(6)]
        renderer.detach(path)
        row = {"targets": name, "params": started[0].trainable_params, "seconds": round(seconds, 1),
               "colour_share": round(colour_share(images, CONCEPT_COLOURS), 3),
               "hist_distance": round(colour_histogram_distance(images, dataset), 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| targets | LoRA params | time (s) | colour share @1.0 | histogram distance |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['targets']} | {r['params']:,} | {r['seconds']} | {r['colour_share']} | {r['hist_distance']} |")


if __name__ == "__main__":
    main()
