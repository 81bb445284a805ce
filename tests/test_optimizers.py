"""The optimizer registry: every entry builds (or names the package to install) and trains."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from trainer import config as tconfig
from trainer.config import TrainConfig
from trainer.errors import TrainerError
from trainer.loop.optimizers import OPTIMIZERS, make_optimizer, set_training_mode


def test_registry_and_config_choices_agree():
    assert tuple(OPTIMIZERS) == tconfig.OPTIMIZERS


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_builds_and_steps_or_names_its_package(name):
    p = torch.nn.Parameter(torch.ones(4, 4))
    groups = [{"params": [p], "lr": 1e-2}]
    config = TrainConfig(optimizer=name)
    package = OPTIMIZERS[name].package
    module = {"bitsandbytes": "bitsandbytes", "transformers": "transformers", "prodigyopt": "prodigyopt",
              "lion-pytorch": "lion_pytorch", "schedulefree": "schedulefree", "": "torch"}[package]
    usable = importlib.util.find_spec(module) is not None and (name != "adamw8bit" or torch.cuda.is_available())
    if not usable:
        with pytest.raises(TrainerError, match=rf"needs the {package} package; `pip install {package}`"):
            make_optimizer(config, groups)
        return
    opt = make_optimizer(config, groups)
    set_training_mode(opt, True)
    before = p.detach().clone()
    (p ** 2).sum().backward()
    opt.step()
    set_training_mode(opt, False)
    assert not torch.equal(before, p.detach())
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)          # the group's own learning rate


def test_unknown_optimizer_is_refused_by_the_config():
    assert "'sgd' is not one of" in TrainConfig(optimizer="sgd").validate()["optimizer"]


def test_schedule_free_trains_and_exports_its_averaged_weights(tmp_path):
    pytest.importorskip("schedulefree")
    from tests.test_train import quick_config, tiny_base
    from trainer.events import Finished
    from trainer.loop.train import train

    events = []
    config = quick_config(tmp_path, optimizer="schedule_free_adamw", lr_scheduler="constant", max_train_steps=3,
                          checkpoint_every_n_steps=2)
    path = train(config, base=tiny_base(), listeners=[events.append])
    assert [e for e in events if isinstance(e, Finished)][0].steps == 3
    from safetensors.torch import load_file
    up = [t for k, t in load_file(str(path)).items() if k.endswith("lora_up.weight")]
    assert any(t.abs().max() > 0 for t in up)                        # trained (B starts at zero)
