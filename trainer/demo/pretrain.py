"""Pretrain the built-in demo model on CPU: `vae` first, then `unet` (+ text encoder) on frozen
latents, then `export` into trainer/assets/builtin/. Time-budgeted, seeded, resumable:

    python -m trainer.demo.pretrain vae  --out pretrain_runs/demo --minutes 35 [--resume]
    python -m trainer.demo.pretrain unet --out pretrain_runs/demo --minutes 60 [--resume]
    python -m trainer.demo.pretrain export --out pretrain_runs/demo [--dest trainer/assets/builtin]
    python -m trainer.demo.pretrain samples [--dest trainer/assets/builtin] [--grid docs/img/demo_samples.png]

The learning rate follows warm-up then cosine decay over *wall-clock* progress (elapsed/minutes),
so a run fits its budget whatever the machine's speed; `--resume` continues the same schedule.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.demo import shapes
from trainer.demo.concept import make_concept_dataset

BUILTIN = Path(__file__).resolve().parent.parent / "assets" / "builtin"


# ------------------------------------------------------------------ settings (one block each)

@dataclass
class VaeSettings:
    batch: int = 32            # images per step
    crop: int = 32             # train on random 32 px crops of 64 px images: 4x cheaper, fully convolutional
    full_frac: float = 0.15    # last 15% of the time on whole 64 px images so mid-attention sees full size
    full_batch: int = 12
    lr: float = 1e-3
    lr_min_frac: float = 0.05  # cosine floor as a fraction of lr
    warmup_steps: int = 100
    l1: float = 1.0            # MSE + L1: L1 keeps flat colours exact
    kl: float = 1e-6           # tiny KL as in SD's VAE; it is an autoencoder in practice
    shape_frac: float = 0.3    # share of captioned-shape scenes in each batch (the rest: texture mix)
    ema: float = 0.998
    clip: float = 1.0
    seed: int = 0


@dataclass
class UnetSettings:
    batch: int = 32
    n_images: int = 8000       # pre-encoded once through the frozen VAE (posterior mean)
    lr: float = 1e-3
    lr_min_frac: float = 0.05
    warmup_steps: int = 100
    snr_gamma: float = 5.0     # min-SNR-gamma loss weighting
    caption_dropout: float = 0.1  # empty caption 10% of the time, for classifier-free guidance
    ema: float = 0.999
    clip: float = 1.0
    seed: int = 0


def lr_at(progress: float, step: int, lr: float, warmup_steps: int, min_frac: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from lr to lr*min_frac as progress goes 0 -> 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def min_snr_weights(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights for epsilon prediction: min(SNR, gamma) / SNR."""
    return torch.clamp(snr, max=gamma) / snr


@torch.no_grad()
def ema_update(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


class Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def _save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------ VAE

def build_vae(config_dir: Path = BUILTIN / "vae"):
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_config(AutoencoderKL.load_config(str(config_dir)))


def vae_eval_sets(size: int = 64) -> dict[str, np.ndarray]:
    """Held-out images never drawn during training (other seeds), plus the unseen concept."""
    rng = np.random.default_rng(10_001)
    shapes_imgs, _ = shapes.make_dataset(48, seed=10_002, size=size)
    concept = np.stack([np.asarray(im) for im, _ in make_concept_dataset(40)])
    return {"textures": shapes.make_texture_batch(rng, 48, size), "shapes": shapes_imgs, "concept": concept}


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch: int = 16) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i:i + batch])
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample))
    return np.concatenate(out)


def recon_mse(vae, images: np.ndarray) -> float:
    """Mean squared error in [0, 1] pixel units between images and their reconstructions."""
    rec = reconstruct(vae, images)
    return float(np.mean(((rec.astype(np.float32) - images.astype(np.float32)) / 255) ** 2))


def vae_batch(rng: np.random.Generator, s: VaeSettings, full: bool) -> torch.Tensor:
    n = s.full_batch if full else s.batch
    n_shape = int(round(n * s.shape_frac))
    imgs = [np.asarray(shapes.make_sample(rng)[0]) for _ in range(n_shape)]
    imgs += [shapes.make_texture(rng) for _ in range(n - n_shape)]
    arr = np.stack(imgs)
    if rng.random() < 0.5:
        arr = arr[:, :, ::-1]
    if not full:
        c = s.crop
        ys, xs = rng.integers(0, 64 - c + 1, size=(2, n))
        arr = np.stack([a[y:y + c, x:x + c] for a, y, x in zip(arr, ys, xs)])
    return to_tensor(np.ascontiguousarray(arr))


def train_vae(out: Path, minutes: float, resume: bool, s: VaeSettings, ckpt_minutes: float = 4.0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "vae_log.txt")
    torch.manual_seed(s.seed)
    vae = build_vae()
    ema = copy.deepcopy(vae).requires_grad_(False)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, elapsed = 0, 0.0
    rng = np.random.default_rng(s.seed)
    ckpt = out / "vae_ckpt.pt"
    if resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(st["model"]), ema.load_state_dict(st["ema"]), opt.load_state_dict(st["opt"])
        step, elapsed = st["step"], st["elapsed"]
        rng = np.random.default_rng([s.seed, step])
        log(f"resumed at step {step}, {elapsed / 60:.1f} min done")
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"VAE {n_params / 1e6:.3f} M params, settings {asdict(s)}, budget {minutes} min")
    evals = vae_eval_sets()
    budget = minutes * 60
    t0, last_ckpt, run_loss = time.time() - elapsed, time.time(), []

    def checkpoint() -> None:
        _save({"model": vae.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
               "elapsed": time.time() - t0, "settings": asdict(s)}, ckpt)
        ema.eval()
        mses = {k: recon_mse(ema, v) for k, v in evals.items()}
        log(f"ckpt step {step}: EMA recon MSE " + " ".join(f"{k} {v:.5f}" for k, v in mses.items()))
        grid = []
        for k in ("shapes", "textures", "concept"):
            grid += list(evals[k][:8]) + list(reconstruct(ema, evals[k][:8]))
        shapes.to_grid(grid, cols=8).save(out / "vae_recon.png")
        ema.save_pretrained(out / "vae", safe_serialization=True)
        (out / "vae" / "eval.json").write_text(json.dumps({"step": step, "minutes": (time.time() - t0) / 60,
                                                           "recon_mse": mses}, indent=1))

    while time.time() - t0 < budget:
        progress = (time.time() - t0) / budget
        full = progress > 1 - s.full_frac
        lr = lr_at(progress, step, s.lr, s.warmup_steps, s.lr_min_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x = vae_batch(rng, s, full)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        rec = F.mse_loss(y, x) + s.l1 * F.l1_loss(y, x)
        loss = rec + s.kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), s.clip)
        opt.step()
        ema_update(ema, vae, min(s.ema, (1 + step) / (10 + step)))
        step += 1
        run_loss.append(rec.item())
        if step % 25 == 0:
            log(f"step {step} {'full' if full else 'crop'} lr {lr:.2e} rec {np.mean(run_loss):.4f} "
                f"kl {post.kl().mean().item():.1f} t {(time.time() - t0) / 60:.1f}m")
            run_loss = []
        if time.time() - last_ckpt > ckpt_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    log("VAE done")


# ------------------------------------------------------------------ UNet + text encoder

SAMPLE_PROMPTS = [shapes.caption(c, sh, b) for c, sh, b in [
    ("red", "circle", "white"), ("blue", "square", "yellow"), ("green", "triangle", "black"),
    ("yellow", "star", "blue"), ("white", "ring", "red"), ("black", "cross", "orange"),
    ("pink", "circle", "green"), ("orange", "square", "purple")]]


def build_text_model(src: Path = BUILTIN):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(src / "text_encoder")))
    return tok, te


def build_unet(src: Path = BUILTIN):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(src / "unet")))


def build_scheduler(src: Path = BUILTIN):
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_pretrained(str(src / "scheduler"))


@torch.no_grad()
def encode_dataset(out: Path, s: UnetSettings, log: Log) -> dict:
    """Encode the captioned shapes once through the frozen VAE (posterior mean), scaled to unit std."""
    from diffusers import AutoencoderKL
    path = out / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    vae = AutoencoderKL.from_pretrained(str(out / "vae")).eval()
    images, captions = shapes.make_dataset(s.n_images, seed=s.seed + 1)
    lat = torch.cat([vae.encode(to_tensor(images[i:i + 64])).latent_dist.mode()
                     for i in range(0, len(images), 64)])
    scaling = float(1.0 / lat.std())
    data = {"latents": lat, "captions": captions, "scaling_factor": scaling}
    _save(data, path)
    log(f"encoded {len(images)} images -> latents {tuple(lat.shape)}, mean {lat.mean():.3f}, "
        f"std {lat.std():.3f}, scaling_factor {scaling:.4f}")
    return data


def make_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    sched = DPMSolverMultistepScheduler.from_pretrained(str(BUILTIN / "scheduler"))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], seeds: list[int], size: int = 64, steps: int = 20,
                guidance: float = 5.0) -> list[np.ndarray]:
    images = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        res = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                   height=size, width=size, output_type="np")
        images += list((res.images * 255).round().astype(np.uint8))
    return images


def train_unet(out: Path, minutes: float, resume: bool, s: UnetSettings, ckpt_minutes: float = 8.0) -> None:
    from diffusers import AutoencoderKL
    from trainer.demo.score import prompt_colour_accuracy
    log = Log(out / "unet_log.txt")
    torch.manual_seed(s.seed)
    data = encode_dataset(out, s, log)
    latents = data["latents"] * data["scaling_factor"]
    tok, te = build_text_model()
    unet = build_unet()
    sched = build_scheduler()
    vae = AutoencoderKL.from_pretrained(str(out / "vae")).eval()
    vae.register_to_config(scaling_factor=data["scaling_factor"])
    uniq = sorted(set(data["captions"])) + [""]
    ids = tok(uniq, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    cap_index = torch.tensor([uniq.index(c) for c in data["captions"]])
    empty = len(uniq) - 1
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.99), weight_decay=1e-2)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    alphas = sched.alphas_cumprod
    snr_all = alphas / (1 - alphas)
    step, elapsed = 0, 0.0
    gen = torch.Generator().manual_seed(s.seed)
    ckpt = out / "unet_ckpt.pt"
    if resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(st["unet"]), te.load_state_dict(st["te"]), opt.load_state_dict(st["opt"])
        ema_unet.load_state_dict(st["ema_unet"]), ema_te.load_state_dict(st["ema_te"])
        step, elapsed = st["step"], st["elapsed"]
        gen = torch.Generator().manual_seed(s.seed * 100_003 + step)
        log(f"resumed at step {step}, {elapsed / 60:.1f} min done")
    log(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.3f} M, text encoder "
        f"{sum(p.numel() for p in te.parameters()) / 1e6:.3f} M, {len(latents)} latents "
        f"{tuple(latents.shape[1:])}, settings {asdict(s)}, budget {minutes} min")
    budget = minutes * 60
    t0, last_ckpt, run_loss = time.time() - elapsed, time.time(), []

    def checkpoint() -> None:
        _save({"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(),
               "ema_unet": ema_unet.state_dict(), "ema_te": ema_te.state_dict(), "step": step,
               "elapsed": time.time() - t0, "scaling_factor": data["scaling_factor"], "settings": asdict(s)}, ckpt)
        ema_unet.eval(), ema_te.eval()
        pipe = make_pipeline(vae, ema_te, tok, ema_unet)
        pipe.set_progress_bar_config(disable=True)
        imgs = sample_grid(pipe, SAMPLE_PROMPTS, seeds=[0])
        shapes.to_grid(imgs, cols=8).resize((1024, 128), 0).save(out / "unet_samples.png")
        acc = prompt_colour_accuracy(imgs, SAMPLE_PROMPTS)
        log(f"ckpt step {step}: EMA samples fg+bg colour right in {acc:.2f} of {len(imgs)}")

    while time.time() - t0 < budget:
        progress = (time.time() - t0) / budget
        lr = lr_at(progress, step, s.lr, s.warmup_steps, s.lr_min_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(latents), (s.batch,), generator=gen)
        x0 = latents[idx]
        cap = cap_index[idx].clone()
        cap[torch.rand(s.batch, generator=gen) < s.caption_dropout] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (s.batch,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        hidden = te(ids[cap])[0]
        pred = unet(xt, t, hidden).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * min_snr_weights(snr_all[t], s.snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.clip)
        opt.step()
        decay = min(s.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay), ema_update(ema_te, te, decay)
        step += 1
        run_loss.append(per.mean().item())
        if step % 25 == 0:
            log(f"step {step} lr {lr:.2e} mse {np.mean(run_loss):.4f} t {(time.time() - t0) / 60:.1f}m")
            run_loss = []
        if time.time() - last_ckpt > ckpt_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    log("UNet done")


# ------------------------------------------------------------------ export

def export(out: Path, dest: Path = BUILTIN) -> None:
    """Write EMA weights into a diffusers folder: fp16 safetensors (small), loaded back as fp32."""
    from diffusers import AutoencoderKL
    st = torch.load(out / "unet_ckpt.pt", weights_only=False)
    tok, te = build_text_model()
    unet = build_unet()
    unet.load_state_dict(st["ema_unet"]), te.load_state_dict(st["ema_te"])
    vae = AutoencoderKL.from_pretrained(str(out / "vae"))
    vae.register_to_config(scaling_factor=round(st["scaling_factor"], 5))
    dest.mkdir(parents=True, exist_ok=True)
    if dest.resolve() != BUILTIN.resolve():
        for sub in ("tokenizer", "scheduler"):
            shutil.copytree(BUILTIN / sub, dest / sub, dirs_exist_ok=True)
        shutil.copy(BUILTIN / "model_index.json", dest / "model_index.json")
    unet.half().save_pretrained(dest / "unet", safe_serialization=True)
    vae.half().save_pretrained(dest / "vae", safe_serialization=True)
    te.half().save_pretrained(dest / "text_encoder", safe_serialization=True)
    # transformers loads a checkpoint in the dtype its config names: keep the text encoder fp32 at load.
    cfg_path = dest / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    for sub in ("unet", "vae"):
        p = dest / sub / "config.json"
        c = json.loads(p.read_text())
        c.pop("_name_or_path", None)  # a local run path means nothing to users
        p.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    total = sum(f.stat().st_size for f in dest.rglob("*.safetensors"))
    print(f"exported step {st['step']} EMA weights to {dest} ({total / 1e6:.1f} MB of weights)")


def sample_exported(dest: Path, grid: Path, seeds: tuple[int, ...] = (0, 1, 2, 3)) -> float:
    """Sample SAMPLE_PROMPTS x seeds from an exported folder, write a grid (rows = seeds), return the
    share of images whose colours match their prompt."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(dest), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    from trainer.demo.score import prompt_colour_accuracy
    imgs = sample_grid(pipe, SAMPLE_PROMPTS, list(seeds))
    grid.parent.mkdir(parents=True, exist_ok=True)
    shapes.to_grid(imgs, cols=len(SAMPLE_PROMPTS)).save(grid, optimize=True)
    acc = prompt_colour_accuracy(imgs, SAMPLE_PROMPTS * len(seeds))
    print(f"{len(imgs)} samples -> {grid}; colours match the prompt in {acc:.2f}")
    return acc


# ------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["vae", "unet", "export", "samples"])
    ap.add_argument("--out", type=Path, default=Path("pretrain_runs/demo"), help="run folder: checkpoints, logs, grids")
    ap.add_argument("--minutes", type=float, default=30.0, help="total training time budget (wall clock)")
    ap.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint in --out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dest", type=Path, default=BUILTIN, help="export target folder")
    ap.add_argument("--grid", type=Path, default=Path("docs/img/demo_samples.png"), help="samples: grid file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.stage == "vae":
        train_vae(a.out, a.minutes, a.resume, VaeSettings())
    elif a.stage == "unet":
        train_unet(a.out, a.minutes, a.resume, UnetSettings())
    elif a.stage == "export":
        export(a.out, a.dest)
    else:
        sample_exported(a.dest, a.grid)


if __name__ == "__main__":
    main()
