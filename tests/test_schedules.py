"""The pure training-maths functions."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from trainer.loop import schedules


def test_step_counts():
    assert schedules.steps_per_epoch(40, 4, 1) == 10
    assert schedules.steps_per_epoch(41, 4, 1) == 11
    assert schedules.steps_per_epoch(40, 4, 3) == 4
    assert schedules.total_steps(40, 4, 1, epochs=10, max_steps=0) == 100
    assert schedules.total_steps(40, 4, 1, epochs=10, max_steps=7) == 7


def test_lr_schedules():
    """diffusers' schedules through make_scheduler: the warm-up first, 'constant' warms up when asked to."""
    from trainer.config import TrainConfig
    from trainer.loop.optimizers import make_scheduler

    def f(step, name, warmup=0):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_scheduler(TrainConfig(lr_scheduler=name, lr_warmup_steps=warmup), opt, 100)
        for _ in range(step):
            opt.step()
            sched.step()
        return sched.get_last_lr()[0]

    assert f(0, "constant") == 1.0 and f(99, "constant") == 1.0
    assert f(0, "constant", 10) == pytest.approx(0.0) and f(10, "constant", 10) == pytest.approx(1.0)
    assert f(5, "constant_with_warmup", 10) == pytest.approx(0.5)
    assert f(0, "cosine") == pytest.approx(1.0)
    assert f(50, "cosine") == pytest.approx(0.5)
    assert f(100, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert f(50, "linear") == pytest.approx(0.5)
    assert f(50, "cosine_with_restarts") == pytest.approx(0.5) and f(50, "polynomial") == pytest.approx(0.5, abs=1e-6)
    values = [f(s, "cosine", 10) for s in range(10, 100, 9)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warm-up


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    eps = schedules.min_snr_weights(snr, 5.0, "epsilon")
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 0.1]))
    v = schedules.min_snr_weights(snr, 5.0, "v_prediction")
    assert torch.allclose(v, torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    assert torch.equal(schedules.min_snr_weights(snr, 0.0, "epsilon"), torch.ones(3))


def test_snr_matches_scheduler():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod[t]
    assert torch.allclose(schedules.snr(sched.alphas_cumprod, t), a / (1 - a))


def test_targets_epsilon_and_v():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.equal(schedules.training_target(sched, latents, noise, t, "epsilon"), noise)
    v = schedules.training_target(sched, latents, noise, t, "v_prediction")
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * noise - (1 - a).sqrt() * latents, atol=1e-6)


def test_noise_offset_and_determinism():
    latents = torch.zeros(2, 4, 8, 8)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = schedules.sample_noise(latents, 0.1, g1)
    b = schedules.sample_noise(latents, 0.1, g2)
    assert torch.equal(a, b)
    plain = schedules.sample_noise(latents, 0.0, torch.Generator().manual_seed(1))
    assert not torch.equal(a, plain)


def test_weighted_mse():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert schedules.weighted_mse(pred, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
    assert math.isclose(schedules.weighted_mse(pred, target, torch.ones(2)).item(), 1.0)


def test_zero_terminal_snr_reaches_snr_zero_with_finite_weights():
    from diffusers import DDPMScheduler

    plain = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="v_prediction")
    ztsnr = schedules.zero_terminal_snr_scheduler(plain)
    t = torch.tensor([0, 500, 999])
    snr_plain, snr_zero = schedules.snr(plain.alphas_cumprod, t), schedules.snr(ztsnr.alphas_cumprod, t)
    assert snr_plain[-1] > 1e-4 and snr_zero[-1] == 0.0              # the rescaled schedule ends at pure noise
    assert ztsnr.config.timestep_spacing == "trailing"
    for kind in ("v_prediction", "epsilon"):
        w = schedules.min_snr_weights(snr_zero, 5.0, kind)
        assert torch.isfinite(w).all() and w[-1] == 0.0
