"""Stage 1 of the demo model's pretraining: the VAE, on procedural shapes and textures
(``python -m trainer.demo.pretrain vae``)."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.demo import shapes
from trainer.demo.concept import make_concept_dataset
from trainer.demo.common import BUILTIN, Log, save_atomic, ema_update, lr_at, to_tensor, to_uint8


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
        save_atomic({"model": vae.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
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
