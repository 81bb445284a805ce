"""Blend (exact and compact) and resize: written dW against sums computed by hand from the files, truncation
errors against the optimal SVD error, LyCORIS dW (LoHa, LoKr, LoCon mid, DoRA) against their formulas."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_export import assert_rel_close, merge_by_hand_sd1, trained
from tests.test_lora import outputs
from trainer.errors import TrainerError
from trainer.files.adapters import apply_adapter
from trainer.files.blend import blend
from trainer.files.deltas import read_network_file
from trainer.files.export import lora_state_dict, save_adapter
from trainer.files.svd import resize_file

Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"   # [32, 32] in the tiny SD1 UNet
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"                               # [16, 16, 3, 3]


def hand_deltas(path) -> dict[str, torch.Tensor]:
    """name -> alpha / r * up @ down as [out, in*kh*kw], from the file's tensors (plain LoRA/LoCon files)."""
    t = load_file(path)
    out = {}
    for key in t:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = t[key].double().flatten(1), t[f"{name}.lora_up.weight"].double().flatten(1)
            alpha = t[f"{name}.alpha"].item() if f"{name}.alpha" in t else down.shape[0]
            out[name] = alpha / down.shape[0] * up @ down
    return out


def summed(items) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for deltas, w in items:
        for name, d in deltas.items():
            total[name] = total.get(name, 0) + w * d.double().flatten(1)
    return total


def optimal_error(delta: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return math.sqrt(float((s[k:] ** 2).sum()) / float((s ** 2).sum()))


def check_fit(report, want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """Each module's written dW is within 1.05x the optimal error at its rank and the report says so;
    returns the largest optimal error (so a caller can check that truncation lost something)."""
    assert got.keys() == want.keys()
    worst = 0.0
    fits = {m.name: m for m in report.modules}
    for name, d in want.items():
        measured = float((got[name] - d).norm() / d.norm())
        best = optimal_error(d, fits[name].rank)
        assert measured <= 1.05 * best + 1e-6, (name, measured, best)
        assert abs(fits[name].rel_error - measured) <= 1e-4 + 1e-3 * measured, (name, fits[name].rel_error, measured)
        worst = max(worst, best)
    lost = sum(float((got[n] - d).norm() ** 2) for n, d in want.items())
    assert report.overall_error == pytest.approx(math.sqrt(lost / sum(float(d.norm() ** 2) for d in want.values())),
                                                 rel=1e-3, abs=1e-6)
    return worst


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two SD1 LoCon files (3x3 conv1 modules too), different ranks and alphas; B covers fewer modules."""
    d = tmp_path_factory.mktemp("svd")
    a, base, _ = trained("sd1", rank=4, alpha=2.0, seed=1, extra_targets=("proj_in", "ff.net.2", "conv1"))
    b, _, _ = trained("sd1", rank=3, alpha=6.0, seed=2, extra_targets=("conv1",))
    pa = save_adapter(d / "a.safetensors", lora_state_dict(a, "sd1"), {"ss_base_model_version": "sd_v1"},
                      dtype=torch.float32)
    pb = save_adapter(d / "b.safetensors", lora_state_dict(b, "sd1"), {}, dtype=torch.float32)
    return pa, pb, base, d


def lycoris_file(d, seed: int = 0):
    """A LoHa module on Q, a LoKr module and a Tucker-LoCon module on convs, with their dW by hand."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    t = {f"{Q}.hada_w1_a": r(32, 3), f"{Q}.hada_w1_b": r(3, 32), f"{Q}.hada_w2_a": r(32, 3),
         f"{Q}.hada_w2_b": r(3, 32), f"{Q}.alpha": torch.tensor(1.5),
         f"{CONV}.lokr_w1": r(4, 4), f"{CONV}.lokr_w2_a": r(4, 2), f"{CONV}.lokr_w2_b": r(2, 36),
         f"{CONV}.alpha": torch.tensor(1.0)}
    mid = "lora_unet_up_blocks_2_resnets_0_conv1"     # [16, 48, 3, 3]
    t.update({f"{mid}.lora_up.weight": r(16, 2, 1, 1), f"{mid}.lora_mid.weight": r(2, 2, 3, 3),
              f"{mid}.lora_down.weight": r(2, 48, 1, 1), f"{mid}.alpha": torch.tensor(4.0)})
    path = d / f"lycoris{seed}.safetensors"
    save_file(t, str(path))
    want = {Q: (t[f"{Q}.hada_w1_a"] @ t[f"{Q}.hada_w1_b"]) * (t[f"{Q}.hada_w2_a"] @ t[f"{Q}.hada_w2_b"]) * 1.5 / 3,
            CONV: torch.kron(t[f"{CONV}.lokr_w1"], t[f"{CONV}.lokr_w2_a"] @ t[f"{CONV}.lokr_w2_b"]) * 1.0 / 2,
            mid: torch.einsum("mnkl,im,nj->ijkl", t[f"{mid}.lora_mid.weight"], t[f"{mid}.lora_up.weight"].flatten(1),
                              t[f"{mid}.lora_down.weight"].flatten(1)).flatten(1) * 4.0 / 2}
    return path, {k: v.double().flatten(1) for k, v in want.items()}


def test_exact_blend_with_negative_weight_and_locon_applies_as_both(loras, tmp_path):
    pa, pb, base, _ = loras
    report = blend([(pa, 0.8), (pb, -0.6)], tmp_path / "exact.safetensors")
    assert report.exact and report.overall_error == 0.0
    got = hand_deltas(report.path)
    want = summed([(hand_deltas(pa), 0.8), (hand_deltas(pb), -0.6)])
    assert any(d.shape[1] == 16 * 9 for d in got.values())                # 3x3 conv (LoCon) modules are in it
    for name, d in want.items():
        assert float((got[name] - d).norm() / d.norm()) < 1e-5, name
    comps = copy.deepcopy(base)
    assert apply_adapter(comps, "sd1", report.path, "blend") == []
    hand = merge_by_hand_sd1(merge_by_hand_sd1(base, load_file(pa), 0.8), load_file(pb), -0.6)
    assert_rel_close(outputs(comps, "sd1"), outputs(hand, "sd1"), tol=1e-5)


def test_compact_blend_is_the_optimal_truncation(loras, tmp_path):
    pa, pb, _, _ = loras
    report = blend([(pa, 1.0), (pb, 0.5)], tmp_path / "compact.safetensors", rank=3)
    assert not report.exact and {m.rank for m in report.modules} <= {3}
    want = summed([(hand_deltas(pa), 1.0), (hand_deltas(pb), 0.5)])
    worst = check_fit(report, want, hand_deltas(report.path))
    assert worst > 0.05 and report.overall_error > 0.01                    # rank 3 < 7: something is lost
    full = blend([(pa, 1.0), (pb, 0.5)], tmp_path / "full.safetensors", rank=7)
    assert full.max_error < 1e-5                                           # rank 4 + 3: nothing is lost
    print(f"compact rank 3: overall {report.overall_error:.4f}, worst {report.max_error:.4f}")


def test_resize_rank_and_energy_keep_the_scale(loras, tmp_path):
    pa, _, _, _ = loras
    want = hand_deltas(pa)
    by_rank = resize_file(pa, tmp_path / "r2.safetensors", rank=2)
    worst = check_fit(by_rank, want, hand_deltas(by_rank.path))
    assert worst > 0.05 and {m.rank for m in by_rank.modules} == {2}
    t = load_file(by_rank.path)
    assert {v.item() for k, v in t.items() if k.endswith(".alpha")} == {1.0}   # UNet scale 2/4 kept: 0.5 x 2
    energy = resize_file(pa, tmp_path / "e.safetensors", energy=0.9)
    check_fit(energy, want, hand_deltas(energy.path))
    for m in energy.modules:
        s = torch.linalg.svdvals(want[m.name]) ** 2
        kept = torch.cumsum(s, 0) / s.sum()
        assert kept[m.rank - 1] >= 0.9 - 1e-9 and (m.rank == 1 or kept[m.rank - 2] < 0.9), m.name
        assert m.rel_error <= math.sqrt(0.1) + 1e-6
    assert len({m.rank for m in energy.modules}) > 1
    print(f"resize rank 2: overall {by_rank.overall_error:.4f}; energy 0.9: overall {energy.overall_error:.4f}")
    with pytest.raises(TrainerError, match="either a rank"):
        resize_file(pa, tmp_path / "x.safetensors", rank=2, energy=0.9)


def test_lycoris_deltas_match_their_formulas_and_compact(loras, tmp_path):
    pa, _, _, d = loras
    path, want = lycoris_file(d)
    nf = read_network_file(path)
    assert {n: m.label for n, m in nf.modules.items()} == {Q: "LoHa", CONV: "LoKr",
                                                           "lora_unet_up_blocks_2_resnets_0_conv1": "LoCon"}
    for name, d_want in want.items():
        torch.testing.assert_close(nf.modules[name].delta().double().flatten(1), d_want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TrainerError, match="holds (LoHa|LoKr) modules .*--rank R"):
        blend([(path, 1.0), (pa, 1.0)], tmp_path / "x.safetensors")
    report = blend([(path, 0.7), (pa, 1.0)], tmp_path / "mixed.safetensors", rank=4)
    total = summed([(want, 0.7), (hand_deltas(pa), 1.0)])
    worst = check_fit(report, total, hand_deltas(report.path))
    assert worst > 0.05                                                     # the LoHa dW has rank 9 > 4
    resized = resize_file(path, tmp_path / "ly.safetensors", rank=16)       # to plain LoRA, at full rank exact
    check_fit(resized, want, hand_deltas(resized.path))
    assert resized.max_error < 1e-5


def test_dora_delta_needs_the_base_and_matches_the_formula(tmp_path):
    g = torch.Generator().manual_seed(5)
    up, down, w = torch.randn(32, 2, generator=g), torch.randn(2, 32, generator=g), torch.randn(32, 32, generator=g)
    magnitude = torch.rand(1, 32, generator=g) + 0.5
    path = tmp_path / "dora.safetensors"
    save_file({f"{Q}.lora_up.weight": up, f"{Q}.lora_down.weight": down, f"{Q}.alpha": torch.tensor(1.0),
               f"{Q}.dora_scale": magnitude}, str(path))
    net = read_network_file(path).modules[Q]
    assert net.label == "DoRA"
    merged = w + 0.5 * up @ down
    want = magnitude * merged / merged.norm(dim=0, keepdim=True) - w     # per input channel, as A1111/ComfyUI
    torch.testing.assert_close(net.delta(w), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TrainerError, match="DoRA.*--model"):
        resize_file(path, tmp_path / "x.safetensors", rank=1)
    with pytest.raises(TrainerError, match="DoRA modules .*--rank R --model MODEL"):
        blend([(path, 1.0)], tmp_path / "x.safetensors")
