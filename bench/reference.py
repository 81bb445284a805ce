"""Measurement: our trainer against the loop users would otherwise run, side by side in one run.

The reference is written from reading diffusers' `examples/text_to_image/train_text_to_image_lora.py`: the VAE
and the text encoder run on every step, PEFT LoRA (rank r, alpha r, gaussian init) on every attention
projection (to_q/to_k/to_v/to_out.0), AdamW (weight decay 1e-2), constant LR, gradient clipping at 1.0,
resize + centre crop + normalise, captions tokenised in the dataset. It uses a plain torch Dataset where the
example uses `datasets` (which would only add to its start-up). Ours runs `python -m trainer train` with the
same model, images, rank/alpha, targets (`--unet-targets attn`), crop (`--no-buckets`), LR, optimizer, batch and
steps, min-SNR off; its caches are on, as by default. The floor is a bare UNet forward + backward + AdamW step with
the same LoRA on fixed latents and text embeddings: what any trainer's step costs once nothing else is left.

Each is a fresh process; whole-process wall time (interpreter start to exit) and peak RSS come from the kernel
(wait4), the median step from each process's own step times.

    python bench/reference.py compare --models builtin,sd15 --resolution 128 --steps 24     # ~10 min, 2 cores
    python bench/reference.py compare --models sd15 --resolution 256 --steps 12
    python bench/reference.py compare --models sd15 --resolution 512 --steps 30 --device cuda

Each side runs at its own default precision (the reference: fp32, as the example's `--mixed_precision`
default; ours: `auto`), and when ours picks another one the reference runs a second time at that precision, so
the table has the equal-precision comparison too; the floor runs at ours' precision.

Results: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


# --- the SD1.5-size model and the images ----------------------------------------------------------------

def save_sd15(folder: str | Path) -> Path:
    """An SD1.5-size diffusers folder (the shipped sd1 configs, random weights, seed 0) with a tokenizer."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT))
    from trainer.models.loader import make_tokenizers

    folder, cfg = Path(folder), ROOT / "trainer" / "assets" / "configs" / "sd1"
    if (folder / "model_index.json").is_file():
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=".sd15-", dir=folder.parent if folder.parent.exists() else None))
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet")).save_pretrained(tmp / "unet")
    AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae")).save_pretrained(tmp / "vae")
    CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder")).save_pretrained(tmp / "text_encoder")
    make_tokenizers("sd1")[0].save_pretrained(tmp / "tokenizer")
    shutil.copytree(cfg / "scheduler", tmp / "scheduler")
    shutil.copy(cfg / "model_index.json", tmp / "model_index.json")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)
    return folder


def write_images(folder: Path, n: int = 8) -> Path:
    """Photo-like JPEGs of mixed sizes with captions (as bench/data_pipeline.py)."""
    import numpy as np
    from PIL import Image

    sizes = [(640, 480), (480, 640), (512, 512), (800, 450), (450, 800), (600, 600), (720, 540), (500, 700)]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC).save(folder / f"img{i}.jpg", quality=92)
        (folder / f"img{i}.txt").write_text(f"zkw, a photo number {i}, outdoors")
    return folder


# --- the reference loop (a child process) ---------------------------------------------------------------

def reference(a: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision=a.precision, cpu=a.device == "cpu")
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.precision]
    scheduler = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(a.model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(a.model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:                # as the example: trainable LoRA weights in fp32 under mixed precision
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    class Photos(torch.utils.data.Dataset):
        def __init__(self, folder: Path):
            self.images = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):   # Resize (bilinear) -> CenterCrop -> ToTensor -> Normalize([0.5], [0.5])
            img = Image.open(self.images[i]).convert("RGB")
            s = a.resolution / min(img.size)
            img = img.resize((max(a.resolution, round(img.width * s)), max(a.resolution, round(img.height * s))),
                             Image.Resampling.BILINEAR)
            left, top = (img.width - a.resolution) // 2, (img.height - a.resolution) // 2
            img = img.crop((left, top, left + a.resolution, top + a.resolution))
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
            caption = self.images[i].with_suffix(".txt").read_text()
            ids = tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                            return_tensors="pt").input_ids[0]
            return {"pixel_values": x, "input_ids": ids}

    loader = torch.utils.data.DataLoader(Photos(Path(a.data)), batch_size=a.batch, shuffle=True)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=a.steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    times, step = [], 0
    unet.train()
    while step < a.steps:
        for batch in loader:
            t0 = time.perf_counter()
            with accelerator.accumulate(unet):
                pixels = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device).long()
                noisy = scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder(batch["input_ids"], return_dict=False)[0]
                pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            step += 1
            if step >= a.steps:
                break
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(unet)))
    StableDiffusionPipeline.save_lora_weights(save_directory=a.out, unet_lora_layers=state, safe_serialization=True)
    Path(a.out, "steps.json").write_text(json.dumps(times))


def floor(a: argparse.Namespace) -> None:
    """UNet forward + backward + AdamW with the same LoRA on fixed inputs: the step with nothing else in it."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev, dtype = torch.device(a.device), {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        a.precision]
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet").to(dev, dtype=dtype)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, **({"fused": True} if dev.type == "cuda" else {}))
    side = a.resolution // 8
    latents = torch.randn(a.batch, unet.config.in_channels, side, side, device=dev, dtype=dtype)
    hidden = torch.randn(a.batch, 77, unet.config.cross_attention_dim, device=dev, dtype=dtype)
    unet.train()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (a.batch,), device=dev)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(latents + noise, t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, "steps.json").write_text(json.dumps(times))


# --- the comparison (the parent process) ---------------------------------------------------------------

def _warm(folder: str) -> None:
    """Read a model folder's files once, so every process finds them in the page cache (the machine may reclaim
    cold cache between runs: the first reader would pay for the disk, not for its code)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def _run(cmd: list[str], warm: str | None = None) -> dict:
    """Wall time and peak RSS of one child process, from the kernel (``warm``: a folder read just before)."""
    if warm:
        _warm(warm)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "DIFFUSERS_VERBOSITY": "error"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20}


def _our_steps(run: Path) -> list[float]:
    stamps = [json.loads(line)["time"] for line in (run / "events.jsonl").read_text().splitlines()
              if '"type": "Progress"' in line]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def compare(a: argparse.Namespace) -> None:
    tmp = Path(a.work or tempfile.mkdtemp(prefix="bench-ref-"))
    data = write_images(tmp / "photos", a.images)
    models = {}
    for name in a.models.split(","):
        if name == "builtin":   # the shipped weights (this process imports no torch: see the sd15 branch)
            models[name] = (str(ROOT / "trainer" / "assets" / "builtin"), 64)
        elif name == "sd15":   # built in a child: a big parent would count in each child's peak RSS (fork)
            folder = tmp / "sd15-random"
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench."
                            f"reference import save_sd15; save_sd15({str(folder)!r})"], check=True)
            models[name] = (str(folder), a.resolution)
        else:
            models[name] = (name, a.resolution)
    rows = []
    me = [sys.executable, str(Path(__file__).resolve())]
    for name, (model, res) in models.items():
        common = ["--model", model, "--resolution", str(res), "--steps", str(a.steps), "--rank", str(a.rank),
                  "--batch", str(a.batch), "--threads", str(a.threads), "--device", a.device]
        for rep in range(a.repeats):            # alternate them, so drift on the machine hits all alike
            out = tmp / f"{name}-{res}px-{rep}"
            ours = _run([sys.executable, "-m", "trainer", "train", "--data", str(data), "--out", str(out / "ours"),
                         "--model", model, "--resolution", str(res), "--steps", str(a.steps), "--rank", str(a.rank),
                         "--alpha", str(a.rank), "--batch-size", str(a.batch), "--unet-targets", "attn",
                         "--no-buckets", "--lr", "1e-4", "--threads", str(a.threads), "--quiet",
                         "--mixed-precision", a.ours_precision, "--no-effect-check",
                         "--set", "min_snr_gamma=0", "--set", "lr_scheduler=constant"], warm=model)
            ours["median_step_s"] = statistics.median(_our_steps(out / "ours")[1:])
            ours["precision"] = json.loads((out / "ours" / "config.json").read_text())["mixed_precision"]
            row = {"model": name, "px": res, "batch": a.batch, "steps": a.steps, "images": a.images, "rep": rep,
                   "ours": ours}
            # the reference at its own default (or --precision), and at ours' precision when that differs
            for key, prec in (("reference", a.precision), ("reference_same_precision", ours["precision"])):
                if key == "reference_same_precision" and prec == a.precision:
                    continue
                ref = _run([*me, "reference", *common, "--precision", prec, "--data", str(data),
                            "--out", str(out / key)], warm=model)
                ref["median_step_s"] = statistics.median(json.loads((out / key / "steps.json").read_text())[1:])
                ref["precision"] = prec
                row[key] = ref
            bare = _run([*me, "floor", *common, "--precision", ours["precision"], "--out", str(out / "floor")],
                        warm=model)
            bare["median_step_s"] = statistics.median(json.loads((out / "floor" / "steps.json").read_text())[1:])
            bare["precision"] = ours["precision"]
            row["floor"] = bare
            row["ours_over_reference_wall"] = ours["wall_s"] / row["reference"]["wall_s"]
            if "reference_same_precision" in row:
                row["ours_over_same_precision_reference_wall"] = (ours["wall_s"] /
                                                                  row["reference_same_precision"]["wall_s"])
            row["ours_over_floor_step"] = ours["median_step_s"] / bare["median_step_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| model | px | run | precision | whole process (s) | median step (s) | peak RSS (GiB) |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        for who in ("reference", "reference_same_precision", "ours", "floor"):
            if who in r:
                m = r[who]
                print(f"| {r['model']} | {r['px']} | {who.replace('_', ' ')} | {m['precision']} | {m['wall_s']:.1f} | "
                      f"{m['median_step_s']:.3f} | {m['peak_rss_gib']:.2f} |")
        same = (f", ours / same-precision reference {r['ours_over_same_precision_reference_wall']:.2f}"
                if "reference_same_precision" in r else "")
        print(f"| | | whole process: ours / reference {r['ours_over_reference_wall']:.2f}{same}; "
              f"step: ours / floor {r['ours_over_floor_step']:.2f} | | | | |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("compare", "reference", "floor"):
        p = sub.add_parser(name)
        p.add_argument("--resolution", type=int, default=128)
        p.add_argument("--steps", type=int, default=24)
        p.add_argument("--rank", type=int, default=16)
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
        p.add_argument("--precision", choices=("no", "fp16", "bf16"), default="no",
                       help="mixed precision of the reference (its default: no) or the floor (frozen weights in "
                            "it, LoRA fp32)")
    c = sub.choices["compare"]
    c.add_argument("--models", default="builtin,sd15", help="builtin, sd15 (random weights) or a diffusers folder")
    c.add_argument("--ours-precision", choices=("auto", "no", "fp16", "bf16"), default="auto",
                   help="ours' mixed_precision (default: its default, auto); the floor and a second reference run "
                        "use what it picked")
    c.add_argument("--images", type=int, default=8)
    c.add_argument("--repeats", type=int, default=1)
    c.add_argument("--work", help="folder for the images, the SD1.5-size model and the runs (default: a temp dir)")
    c.add_argument("--json")
    for name in ("reference", "floor"):
        sub.choices[name].add_argument("--model", required=True)
        sub.choices[name].add_argument("--out", required=True)
    sub.choices["reference"].add_argument("--data", required=True)
    a = ap.parse_args()
    {"compare": compare, "reference": reference, "floor": floor}[a.command](a)


if __name__ == "__main__":
    main()
