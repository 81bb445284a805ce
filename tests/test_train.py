"""The training loop end to end on tiny models: learning, step-0 identity, seeds, events, stop."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.tiny_models import build_tiny
from trainer.loop import schedules
from trainer.config import TrainConfig
from trainer.events import Control, Finished, Progress, Saved, Started
from trainer.network.lora import groups_from_config, inject
from trainer.models.loader import BaseModel, encode_prompts
from trainer.loop.train import train

COLOURS = [(220, 30, 30), (30, 200, 60), (40, 60, 220), (240, 200, 20)]


def tiny_base(arch: str = "sd1") -> BaseModel:
    t = build_tiny(arch)
    t["scheduler"].register_to_config(prediction_type="epsilon")
    return BaseModel(arch=arch, prediction_type="epsilon", unet=t["unet"], vae=t["vae"],
                     text_encoders=t["text_encoders"], tokenizers=t["tokenizers"],
                     noise_scheduler=t["scheduler"], name=f"tiny-{arch}", source="tests", resolution=64)


def write_dataset(folder, n: int = 4) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (80, 64), COLOURS[i % 4])
        img.paste((255, 255, 255), (16 + i, 16, 40 + i, 40))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a square number {i}")
    return str(folder)


def quick_config(tmp_path, **kw) -> TrainConfig:
    base = dict(data_dir=write_dataset(tmp_path / "data"), output_dir=str(tmp_path / "run"), resolution=64,
                rank=4, alpha=4.0, learning_rate=1e-3, max_train_steps=4, batch_size=2, seed=7,
                lr_scheduler="constant", min_snr_gamma=0.0)
    base.update(kw)
    return TrainConfig(**base)


def stop_at(control: Control, step: int):
    """A listener that asks ``control`` to stop once step ``step`` is done (a run cut short for a resume)."""
    def listen(event) -> None:
        if isinstance(event, Progress) and event.step == step:
            control.stop()
    return listen


def fixed_batch_loss(base: BaseModel, pixels: torch.Tensor, captions: list[str]) -> float:
    """Loss with fixed noise and timesteps, so two evaluations differ only by the weights."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = base.vae.encode(pixels).latent_dist.mean * base.vae.config.scaling_factor
        noise = schedules.sample_noise(latents, 0.0, g)
        t = torch.tensor([100, 400, 700, 900][: len(captions)])
        noisy = base.noise_scheduler.add_noise(latents, noise, t)
        cond = encode_prompts(base, captions)
        pred = base.unet(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        return torch.nn.functional.mse_loss(pred, noise).item()


def dataset_batch(config: TrainConfig) -> dict:
    from trainer.data.dataset import LoraDataset, collate
    from trainer.data.scan import scan_dataset
    dataset = LoraDataset(scan_dataset(config.data_dir, resolution=config.resolution), config.resolution)
    return collate([dataset[i] for i in range(len(dataset))])


def test_overfit_fixed_batch_loss_falls(tmp_path):
    """The loop's loss + optimizer on one fixed batch (same image, noise, timesteps): memorised.

    A random tiny UNet has no denoising ability for attention-only LoRA to steer, so this uses
    LoRA on every linear and conv layer (LoCon-style targets) to show the gradient path works.
    """
    from trainer.loop.train import diffusion_loss, make_optimizer
    base = tiny_base()
    every_layer = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_in", "conv_out", "conv_shortcut"]
    config = quick_config(tmp_path, rank=8, alpha=8.0, learning_rate=1e-2, unet_targets=every_layer,
                          train_text_encoder=True, text_encoder_lr=1e-3)
    params = inject(base.components(), groups_from_config(config, base.components()))
    optimizer = make_optimizer(config, [{"params": p, "lr": 1e-2} for p in params.values()])
    batch, gen = dataset_batch(config), torch.Generator()
    batch = {"pixel_values": batch["pixel_values"][:1], "captions": batch["captions"][:1]}
    alphas = base.noise_scheduler.alphas_cumprod
    losses = []
    for _ in range(25):
        gen.manual_seed(0)
        loss = diffusion_loss(base, base.unet, batch, config, base.noise_scheduler, alphas, gen,
                              torch.float32, torch.device("cpu"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_train_lowers_loss_on_its_data(tmp_path):
    """End to end through train(): the loss on the dataset (fixed noise draws) goes down."""
    base = tiny_base()
    config = quick_config(tmp_path, max_train_steps=20, batch_size=4, learning_rate=1e-2, rank=8, alpha=8.0)
    batch = dataset_batch(config)
    before = fixed_batch_loss(base, batch["pixel_values"], batch["captions"])
    train(config, base=base)
    after = fixed_batch_loss(base, batch["pixel_values"], batch["captions"])
    assert after < 0.95 * before, (before, after)


def test_step_zero_equals_base(tmp_path):
    base = tiny_base()
    x = torch.randn(1, 4, 8, 8)
    cond = encode_prompts(base, ["a red square"])["encoder_hidden_states"]
    with torch.no_grad():
        ref = base.unet(x, torch.tensor([500]), encoder_hidden_states=cond).sample
    inject(base.components(), groups_from_config(TrainConfig(train_text_encoder=True), base.components()))
    with torch.no_grad():
        cond2 = encode_prompts(base, ["a red square"])["encoder_hidden_states"]
        out = base.unet(x, torch.tensor([500]), encoder_hidden_states=cond2).sample
    assert torch.equal(cond, cond2)
    assert torch.equal(ref, out)


def test_seed_reproducible_and_seed_matters(tmp_path):
    paths = []
    for i, seed in enumerate((7, 7, 8)):
        config = quick_config(tmp_path, output_dir=str(tmp_path / f"run{i}"), seed=seed)
        paths.append(train(config, base=tiny_base()))
    a, b, c = (load_file(p) for p in paths)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("lora_down.weight"))


def test_events_config_and_outputs(tmp_path):
    events = []
    config = quick_config(tmp_path, save_every_n_steps=2, name="mine")
    path = train(config, base=tiny_base(), listeners=[events.append])
    assert path == tmp_path / "run" / "mine.safetensors" and path.is_file()
    kinds = [type(e) for e in events]
    assert kinds.count(Started) == 1 and kinds[-1] is Finished
    steps = [e.step for e in events if isinstance(e, Progress)]
    assert steps == [1, 2, 3, 4]
    progress = [e for e in events if isinstance(e, Progress)]
    assert all(p.loss > 0 and p.lr > 0 for p in progress)
    assert [p.eta_s is None for p in progress] == [True, True, False, False]   # the first 2 steps: warm-up
    assert all(p.eta_s >= 0 and p.it_per_s > 0 for p in progress[2:])
    saved = [e for e in events if isinstance(e, Saved)]
    assert [s.final for s in saved] == [False, True]
    assert (tmp_path / "run" / "mine-step000002.safetensors").is_file()
    saved_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved_config["rank"] == 4 and saved_config["resolution"] == 64
    assert not events[-1].stopped_early


def test_stop_request_saves_adapter(tmp_path):
    control = Control()
    events = []

    def listener(event):
        events.append(event)
        if isinstance(event, Progress) and event.step == 2:
            control.stop()

    config = quick_config(tmp_path, max_train_steps=50)
    path = train(config, base=tiny_base(), listeners=[listener], control=control)
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.stopped_early and finished.steps == 2
    assert path.is_file() and load_file(path)


def test_auto_resolution_uses_model_native_size(tmp_path):
    config = quick_config(tmp_path, resolution=0, max_train_steps=1)
    train(config, base=tiny_base())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resolution"] == 64


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    events = []
    config = quick_config(tmp_path, gradient_accumulation_steps=2, batch_size=1, max_train_steps=3)
    train(config, base=tiny_base(), listeners=[events.append])
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3]


def test_bf16_mixed_precision_keeps_lora_fp32(tmp_path):
    base = tiny_base()
    config = quick_config(tmp_path, mixed_precision="bf16", max_train_steps=2)
    train(config, base=base)
    lora = [p for n, p in base.unet.named_parameters() if "lora_" in n]
    frozen = [p for n, p in base.unet.named_parameters() if "lora_" not in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == torch.bfloat16 for p in frozen)


def test_fp16_without_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from trainer.errors import TrainerError
    with pytest.raises(TrainerError, match="fp16.*bf16"):
        train(quick_config(tmp_path, mixed_precision="fp16"), base=tiny_base())


def test_single_file_checkpoint_loads_and_trains(tmp_path):
    """A user's single-file .safetensors (written here in the original LDM layout) trains."""
    from trainer.models.loader import load_base_model, save_config_folder, save_single_file
    tiny = tiny_base()
    ckpt = save_single_file(tiny, tmp_path / "model.safetensors")
    configs = save_config_folder(tiny, tmp_path / "configs")
    base = load_base_model(str(ckpt), config_dir=str(configs))
    assert (base.arch, base.prediction_type) == ("sd1", "epsilon")
    path = train(quick_config(tmp_path, model=str(ckpt), max_train_steps=2), base=base)
    tensors = load_file(path)
    assert any(k.startswith("lora_unet_") for k in tensors)


def test_unexpected_failure_keeps_the_adapter_so_far(tmp_path):
    from trainer.events import Failed
    events = []

    def listener(event):
        events.append(event)
        if isinstance(event, Progress) and event.step == 2:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        train(quick_config(tmp_path, max_train_steps=10), base=tiny_base(), listeners=[listener])
    kept = tmp_path / "run" / "lora-step000002-interrupted.safetensors"
    assert kept.is_file() and load_file(kept)
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.step == 2 and str(kept) in failed.message


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    """Checkpointing trades compute for memory; the trained LoRA must be the same."""
    plain = train(quick_config(tmp_path, output_dir=str(tmp_path / "a"), max_train_steps=2,
                               train_text_encoder=True), base=tiny_base())
    base = tiny_base()
    ckpt = train(quick_config(tmp_path, output_dir=str(tmp_path / "b"), max_train_steps=2,
                              train_text_encoder=True, gradient_checkpointing=True), base=base)
    assert base.unet.is_gradient_checkpointing and base.text_encoders[0].is_gradient_checkpointing
    a, b = load_file(plain), load_file(ckpt)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


def test_zero_terminal_snr_needs_v_prediction_and_trains_with_it(tmp_path):
    from trainer.errors import TrainerError

    with pytest.raises(TrainerError, match="zero_terminal_snr needs a v-prediction model") as err:
        train(quick_config(tmp_path, zero_terminal_snr=True, max_train_steps=1), base=tiny_base())
    assert err.value.field == "zero_terminal_snr"
    base = tiny_base()
    base.prediction_type = "v_prediction"
    base.noise_scheduler.register_to_config(prediction_type="v_prediction")
    events = []
    train(quick_config(tmp_path, zero_terminal_snr=True, max_train_steps=3, min_snr_gamma=5.0), base=base,
          listeners=[events.append])
    assert base.noise_scheduler.alphas_cumprod[-1] == 0.0
    assert all(math.isfinite(e.loss) for e in events if isinstance(e, Progress))
