"""Fused previews: adapters merged into the weights for a render match the unfused render, and the base
weights come back bit for bit (repeated previews never drift)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_train import quick_config, tiny_base
from trainer.loop.train import train
from trainer.render.generate import RenderSettings, Renderer


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused")
    return train(quick_config(tmp, max_train_steps=6, learning_rate=5e-2, conv_rank=2), base=tiny_base())


def test_fused_render_matches_unfused_and_restores_the_weights(adapter):
    base = tiny_base()
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    settings = RenderSettings(prompt="a square number 1", steps=3, seed=3, output_type="np")
    fused = Renderer(base, fuse=True)
    a = fused.render(settings, {str(adapter): 0.8})
    fused.fuse = False
    b = fused.render(settings, {str(adapter): 0.8})
    zero = fused.render(settings, {str(adapter): 0.0})
    assert np.abs(a - b).max() < 2e-4                     # same image: merged weights vs the adapter branch
    assert np.abs(a - zero).max() > 1e-3                  # and the adapter does change it
    fused.fuse = True
    for w in (0.3, 1.2, -0.5, 0.8):                       # slider moves: merge and restore each time
        fused.render(settings, {str(adapter): w})
    after = fused.base.unet.state_dict()
    for k, v in before.items():                           # base weights exactly as loaded
        kk = next((n for n in (k, k.replace(".weight", ".base_layer.weight"),
                               k.replace(".bias", ".base_layer.bias")) if n in after), None)
        assert kk is not None and torch.equal(after[kk], v), k
    assert np.array_equal(fused.render(settings, {str(adapter): 0.8}), a)
