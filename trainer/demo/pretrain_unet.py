"""Stage 2 of the demo model's pretraining: the UNet and text encoder on frozen VAE latents
(``python -m trainer.demo.pretrain unet``)."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.demo import shapes
from trainer.demo.common import BUILTIN, Log, save_atomic, ema_update, lr_at, min_snr_weights, to_tensor


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
    save_atomic(data, path)
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
        save_atomic({"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(),
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
