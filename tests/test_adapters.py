"""Reading LoRA files, applying several at once, live strengths, removal and blending."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_export import assert_differs, assert_rel_close, merge_by_hand_sd1, trained
from tests.test_lora import outputs
from trainer.files.adapters import apply_adapter, attached, blend_files, read_lora_file, remove_adapter, set_weights
from trainer.errors import TrainerError
from trainer.files.export import lora_state_dict, save_adapter
from trainer.network.lora import lora_modules


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    """Two SD1 LoRA files (different seeds, ranks, alphas; B covers fewer modules) and the base."""
    d = tmp_path_factory.mktemp("loras")
    a, base, _ = trained("sd1", rank=4, alpha=2.0, seed=1)
    b, _, _ = trained("sd1", rank=2, alpha=8.0, seed=2, extra_targets=())
    pa = save_adapter(d / "a.safetensors", lora_state_dict(a, "sd1"), {"ss_base_model_version": "sd_v1"},
                      dtype=torch.float32)
    pb = save_adapter(d / "b.safetensors", lora_state_dict(b, "sd1"), {"ss_base_model_version": "sd_v1"},
                      dtype=torch.float32)
    return pa, pb, base


def hand(base: dict, items: list) -> dict:
    merged = base
    for path, w in items:
        merged = merge_by_hand_sd1(merged, load_file(path), w)
    return outputs(merged, "sd1")


def test_read_errors_are_clear(tmp_path):
    with pytest.raises(TrainerError, match="does not exist"):
        read_lora_file(tmp_path / "missing.safetensors")
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(TrainerError, match="not a .safetensors"):
        read_lora_file(ckpt)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(TrainerError, match="cannot be read"):
        read_lora_file(junk)
    full = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(full))
    with pytest.raises(TrainerError, match="not a LoRA"):
        read_lora_file(full)
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.alpha": torch.tensor(1.0)}, str(loha))
    with pytest.raises(TrainerError, match="LyCORIS"):
        read_lora_file(loha)


def test_unplaceable_keys_are_reported_not_dropped(two_files, tmp_path):
    pa, _, base = two_files
    tensors = load_file(pa)
    tensors["lora_unet_no_such_module.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_no_such_module.lora_up.weight"] = torch.zeros(8, 4)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"
    tensors[f"{name}.lora_down.weight"] = torch.zeros(4, 7)           # wrong input width
    tensors["lora_unet_x.dora_scale"] = torch.zeros(3)
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path))
    comps = copy.deepcopy(base)
    missing = apply_adapter(comps, "sd1", path, "odd")
    assert "lora_unet_no_such_module" in missing
    assert f"{name} (shape mismatch: file [32, 7] vs model [32, 32])" in missing
    assert "lora_unet_x.dora_scale" in missing
    assert len(lora_modules(comps, "odd")) == len(load_file(pa)) // 3 - 1


def test_several_adapters_live_weights_negative_and_removal(two_files):
    pa, pb, base = two_files
    comps = copy.deepcopy(base)
    base_out = outputs(base, "sd1")
    assert apply_adapter(comps, "sd1", pa, "a", weight=1.0) == []
    assert apply_adapter(comps, "sd1", pb, "b", weight=0.5) == []
    assert attached(comps) == ["a", "b"]
    assert_rel_close(outputs(comps, "sd1"), hand(base, [(pa, 1.0), (pb, 0.5)]))
    assert_differs(outputs(comps, "sd1"), base_out)
    set_weights(comps, {"a": -0.7})                      # b keeps 0.5: only named adapters change
    assert_rel_close(outputs(comps, "sd1"), hand(base, [(pa, -0.7), (pb, 0.5)]))
    set_weights(comps, {"a": 0.0, "b": 0.0})
    for k, v in outputs(comps, "sd1").items():
        assert torch.equal(v, base_out[k]), k
    set_weights(comps, {"b": 1.0})
    assert_rel_close(outputs(comps, "sd1"), hand(base, [(pb, 1.0)]))
    with pytest.raises(TrainerError, match="not attached"):
        set_weights(comps, {"zzz": 1.0})
    remove_adapter(comps, "a")
    remove_adapter(comps, "b")
    assert attached(comps) == []
    assert not any("lora" in n for n, _ in comps["unet"].named_modules())    # plain layers are back
    for k, v in outputs(comps, "sd1").items():
        assert torch.equal(v, base_out[k]), k


def test_preview_adapter_does_not_disturb_training_adapter(two_files):
    pa, _, _ = two_files
    comps, _, _ = trained("sd1", te=False)
    trainable = {id(p) for m in comps.values() for p in m.parameters() if p.requires_grad}
    before = outputs(comps, "sd1")
    apply_adapter(comps, "sd1", pa, "preview", weight=0.0)
    assert {id(p) for m in comps.values() for p in m.parameters() if p.requires_grad} == trainable
    for k, v in outputs(comps, "sd1").items():
        assert torch.equal(v, before[k]), k
    assert all("default" in layer.active_adapters for _, layer in lora_modules(comps).values())
    remove_adapter(comps, "preview")
    assert len(lora_modules(comps)) > 0 and attached(comps) == ["default"]


def test_blend_equals_applying_both(two_files, tmp_path):
    pa, pb, base = two_files
    out = blend_files([(pa, 1.0), (pb, 0.5)], tmp_path / "blend.safetensors", {"note": "test"})
    lora = read_lora_file(out)
    assert lora.metadata["ss_base_model_version"] == "sd_v1" and lora.metadata["note"] == "test"
    assert len({m["alpha"] for m in lora.modules.values()}) == 1          # one alpha: safe in diffusers
    assert lora.modules[next(iter(lora.modules))]["down"].dtype == torch.float32
    blended = copy.deepcopy(base)
    assert apply_adapter(blended, "sd1", lora, "blend") == []
    both = copy.deepcopy(base)
    apply_adapter(both, "sd1", pa, "a", weight=1.0)
    apply_adapter(both, "sd1", pb, "b", weight=0.5)
    assert_rel_close(outputs(blended, "sd1"), outputs(both, "sd1"), tol=1e-5)
    assert_rel_close(outputs(blended, "sd1"), hand(base, [(pa, 1.0), (pb, 0.5)]))


def test_blend_rejects_mismatched_models(two_files, tmp_path):
    pa, _, _ = two_files
    other = tmp_path / "xl.safetensors"
    tensors = load_file(pa)
    save_file(tensors, str(other), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(TrainerError, match="different base models"):
        blend_files([(pa, 1.0), (other, 1.0)], tmp_path / "x.safetensors")
    with pytest.raises(TrainerError, match="Nothing to blend"):
        blend_files([], tmp_path / "x.safetensors")
