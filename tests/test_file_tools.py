"""Adapter file tools: inspect, convert round trips, refusals that name the module and shapes, preview adapter
names never reused, ss_num_epochs, and the CLI subcommands (tiny SD1/SDXL files, CPU)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_export import assert_rel_close, merge_by_hand_sd1, sd1_pipe, trained
from tests.test_lora import outputs
from tests.test_models import as_base
from tests.tiny_models import build_tiny
from trainer.cli import main
from trainer.config import TrainConfig
from trainer.errors import TrainerError
from trainer.files.adapters import apply_adapter, read_lora_file
from trainer.files.bake import bake
from trainer.files.blend import blend
from trainer.files.convert import convert_file
from trainer.files.export import build_metadata, lora_state_dict, save_adapter
from trainer.files.inspect import inspect_file
from trainer.models.loader import save_config_folder
from trainer.render.generate import RenderSettings, Renderer

Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"   # [32, 32] in the tiny SD1 UNet


def save(tmp, name: str, tensors: dict, metadata: dict | None = None):
    return save_adapter(tmp / name, tensors, metadata or {}, dtype=torch.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """SD1 files a, b, c (different seeds/ranks/alphas), an SDXL file and the tiny SD1 base components."""
    d = tmp_path_factory.mktemp("files")
    made = {}
    for key, arch, rank, alpha, seed in (("a", "sd1", 4, 2.0, 1), ("b", "sd1", 2, 8.0, 2), ("c", "sd1", 3, 1.0, 3),
                                         ("xl", "sdxl", 4, 2.0, 4)):
        comps, base, _ = trained(arch, rank=rank, alpha=alpha, seed=seed)
        md = {"ss_base_model_version": "sd_v1" if arch == "sd1" else "sdxl_base_v1-0"}
        made[key] = save(d, f"{key}.safetensors", lora_state_dict(comps, arch), md)
        made[f"{arch}_base"] = base
    made["dir"] = d
    return made


# --- inspect ----------------------------------------------------------------------------------
def test_inspect_our_files(files):
    sd1 = inspect_file(files["a"])
    assert (sd1.format, sd1.architecture, sd1.network_types) == ("kohya-diffusers", "sd1/sd2", {"LoRA": 50})
    assert sd1.groups["unet"].ranks == {4: 42} and sd1.groups["unet"].alphas == {2.0: 42}
    assert sd1.groups["text_encoder"].ranks == {2: 8} and sd1.groups["text_encoder"].alphas == {3.0: 8}
    assert sd1.metadata["ss"]["ss_base_model_version"] == "sd_v1" and sd1.warnings == []
    xl = inspect_file(files["xl"])
    assert (xl.format, xl.architecture) == ("kohya-sgm", "sdxl") and set(xl.groups) == {"unet", "text_encoder",
                                                                                          "text_encoder_2"}
    assert xl.warnings == []
    as_json = json.loads(json.dumps(xl.to_dict()))
    assert as_json["modules"][0].keys() == {"name", "group", "type", "rank", "alpha", "shape"}
    assert "sdxl" in xl.summary() and "no warnings" in xl.summary()


def test_inspect_warns(files, tmp_path):
    tensors = load_file(files["xl"])
    up = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[up] = torch.zeros_like(tensors[up])
    del tensors[up.replace("lora_up.weight", "alpha")]
    tensors["lora_unet_extra.weird_part"] = torch.ones(2)
    tensors[next(k for k in tensors if k.startswith("lora_unet_") and k.endswith(".alpha"))] = torch.tensor(5.0)
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1", "ss_network_dim": "16"})
    report = inspect_file(path)
    text = "\n".join(report.warnings)
    assert "ss_base_model_version = 'sd_v1' says sd1, but the keys are sdxl's" in text and "A1111 hides" in text
    assert "1 modules have no alpha" in text and "all-zero lora_up" in text and up.split(".")[0] in text
    assert "ss_network_dim = 16" in text and "lora_unet_extra.weird_part" in text
    assert "UNet modules have different alphas (2, 5)" in text
    assert report.unknown == ["lora_unet_extra.weird_part"]


def test_inspect_lycoris_types(tmp_path):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"    # [16, 16, 3, 3]
    tensors = {f"{Q}.hada_w1_a": r(32, 2), f"{Q}.hada_w1_b": r(2, 32), f"{Q}.hada_w2_a": r(32, 2),
               f"{Q}.hada_w2_b": r(2, 32), f"{Q}.alpha": torch.tensor(1.0), f"{conv}.lokr_w1": r(4, 4),
               f"{conv}.lokr_w2_a": r(4, 2), f"{conv}.lokr_w2_b": r(2, 36), f"{conv}.alpha": torch.tensor(2.0)}
    path = tmp_path / "ly.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    report = inspect_file(path)
    assert report.format == "lycoris" and report.network_types == {"LoHa": 1, "LoKr": 1}
    assert {m["name"]: m["shape"] for m in report.modules} == {Q: [32, 32], conv: [16, 144]}
    assert any("diffusers does not" in w for w in report.warnings)
    assert any("ss_network_module = networks.lora" in w for w in report.warnings)


# --- convert ----------------------------------------------------------------------------------
def test_convert_round_trip_sd1_exact_and_diffusers_loads_it(files, tmp_path):
    base = files["sd1_base"]
    config = save_config_folder(as_base(build_tiny("sd1")), tmp_path / "configs")
    peft = convert_file(files["a"], tmp_path / "a-peft.safetensors", to="peft", model=str(config))
    assert (peft.to, peft.modules) == ("peft", 50)
    original = load_file(files["a"])
    hand = outputs(merge_by_hand_sd1(base, original, 1.0), "sd1")
    pipe = sd1_pipe(copy.deepcopy(base))
    pipe.load_lora_weights(str(peft.path), adapter_name="p")          # alphas 2 (UNet) and 3 (text encoder)
    assert_rel_close(outputs({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "sd1"), hand, tol=1e-5)
    back = load_file(convert_file(peft.path, tmp_path / "a-back.safetensors", to="kohya").path)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


def test_convert_round_trip_sdxl_with_shipped_layout(files, tmp_path):
    peft = convert_file(files["xl"], tmp_path / "xl-peft.safetensors", to="peft")     # no model: shipped configs
    keys = load_file(peft.path)
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert any(k.startswith("unet.down_blocks.") for k in keys) and read_lora_file(peft.path).format == "peft"
    original = load_file(files["xl"])
    back = load_file(convert_file(peft.path, tmp_path / "xl-back.safetensors", to="kohya").path)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


def test_convert_refuses(files, tmp_path):
    with pytest.raises(TrainerError, match="already in the kohya layout"):
        convert_file(files["a"], tmp_path / "x.safetensors", to="kohya")
    odd = load_file(files["a"])
    odd.update({"lora_unet_no_such_block_to_q.lora_down.weight": torch.ones(1, 4),
                "lora_unet_no_such_block_to_q.lora_up.weight": torch.ones(4, 1)})
    save_file(odd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(TrainerError, match=r"1 modules the sd1 layout does not have \(lora_unet_no_such_block_to_q\)"
                                           ".*--model"):
        convert_file(tmp_path / "odd.safetensors", tmp_path / "x.safetensors", to="peft")
    loha = tmp_path / "loha.safetensors"
    save_file({f"{Q}.hada_w1_a": torch.ones(32, 1), f"{Q}.hada_w1_b": torch.ones(1, 32),
               f"{Q}.hada_w2_a": torch.ones(32, 1), f"{Q}.hada_w2_b": torch.ones(1, 32)}, str(loha))
    with pytest.raises(TrainerError, match="LoHa modules .*LoRA/LoCon only"):
        convert_file(loha, tmp_path / "x.safetensors", to="peft")


# --- refusals ---------------------------------------------------------------------------------
def test_other_architecture_is_a_shape_mismatch_with_shapes(files, tmp_path):
    sdxl = Renderer(as_base(build_tiny("sdxl")))
    with pytest.raises(TrainerError) as err:
        sdxl.attach(files["a"])                          # SD1 file on SDXL: to_k reads 32 wide, the model 64
    message = str(err.value)
    assert "shape mismatch in lora_unet_" in message and "attn2_to_k: file [32, 32] vs model [32, 64]" in message
    assert "does not have" not in message and sdxl._names == {}
    sd1 = as_base(build_tiny("sd1"))
    with pytest.raises(TrainerError, match=r"shape mismatch in lora_unet_input_blocks_\S+: file \[32, 64\] vs "
                                           r"model \[32, 32\].*looks made for sdxl"):
        Renderer(sd1).attach(files["xl"])                # SDXL file on SD1
    with pytest.raises(TrainerError, match=r"shape mismatch in .*file \[32, 64\] vs model \[32, 32\]"):
        bake(sd1, [(files["xl"], 1.0)], tmp_path / "baked.safetensors")
    assert not (tmp_path / "baked.safetensors").exists()


def test_unknown_tensors_are_named(files, tmp_path):
    tensors = load_file(files["a"])
    tensors["lora_unet_something.unknown_part"] = torch.ones(3)
    tensors[f"{Q}.dora_scale"] = torch.ones(1, 32)
    path = tmp_path / "extra.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(TrainerError, match=r"tensors this tool cannot apply \(.*lora_unet_something.unknown_part"):
        Renderer(as_base(build_tiny("sd1"))).attach(path)
    with pytest.raises(TrainerError, match="lora_unet_something.unknown_part"):
        bake(as_base(build_tiny("sd1")), [(path, 1.0)], tmp_path / "b.safetensors")
    with pytest.raises(TrainerError, match="lora_unet_something.unknown_part"):
        blend([(path, 1.0)], tmp_path / "x.safetensors")


# --- preview names ----------------------------------------------------------------------------
def _image(renderer: Renderer, loras: dict):
    settings = RenderSettings(prompt="a red square", seed=3, steps=2, guidance=3.0, output_type="np")
    return torch.from_numpy(renderer.render(settings, loras))


def test_preview_never_reuses_a_live_adapter_name(files):
    a, b, c = files["a"], files["b"], files["c"]
    want = {p: _image(Renderer(as_base(build_tiny("sd1"))), {p: 1.0}) for p in (b, c)}
    assert (want[b] - want[c]).abs().max() > 1e-3          # B and C render differently: the check can fail
    renderer = Renderer(as_base(build_tiny("sd1")))
    names = [renderer.attach(a), renderer.attach(b)]
    renderer.detach(a)
    names.append(renderer.attach(c))                       # the old rule named it lora1, B's live name
    for path in (b, c):                                    # each renders its own weights
        torch.testing.assert_close(_image(renderer, {path: 1.0}), want[path], rtol=0, atol=1e-5)
    assert len(set(names)) == 3
    renderer.detach(b)
    renderer.detach(c)
    fresh = [renderer.attach(p) for p in (b, c)]            # the brief's order: A out, then B and C back in
    assert not set(fresh) & set(names)
    for path in (b, c):
        torch.testing.assert_close(_image(renderer, {path: 1.0}), want[path], rtol=0, atol=1e-5)


# --- metadata ---------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,epoch,want", [(5, 0, "1"), (30, 2, "3"), (0, 0, "0")])
def test_ss_num_epochs_counts_the_epochs_run(steps, epoch, want):
    md = build_metadata(TrainConfig(epochs=10, max_train_steps=5), arch="sd1", prediction_type="epsilon",
                        base_name="b", resolution=64, num_images=4, steps=steps, epoch=epoch, tag_frequency={},
                        training_started_at=0.0)
    assert (md["ss_num_epochs"], md["ss_epoch"]) == (want, want)


# --- command line -----------------------------------------------------------------------------
def test_cli_file_tools(files, tmp_path, capsys):
    assert main(["inspect", str(files["a"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["network_types"] == {"LoRA": 50}
    out = tmp_path / "blend.safetensors"
    assert main(["blend", f"{files['a']}:0.5", f"{files['b']}:-0.25", "--out", str(out), "--rank", "3"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out) and "relative error overall" in printed[2]
    assert main(["resize", str(files["a"]), "--energy", "0.9", "--out", str(tmp_path / "r.safetensors")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "r.safetensors")
    assert main(["convert", str(files["xl"]), "--to", "peft", "--out", str(tmp_path / "p.safetensors")]) == 0
    capsys.readouterr()
    loha = tmp_path / "loha.safetensors"
    save_file({f"{Q}.hada_w1_a": torch.ones(32, 1), f"{Q}.hada_w1_b": torch.ones(1, 32),
               f"{Q}.hada_w2_a": torch.ones(32, 1), f"{Q}.hada_w2_b": torch.ones(1, 32)}, str(loha))
    assert main(["blend", f"{loha}:1", f"{files['a']}:1", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'loha.safetensors' holds LoHa modules") and "--rank R" in err
    assert "Traceback" not in err and not (tmp_path / "x.safetensors").exists()


def test_apply_reports_shapes_for_a_mismatch(files):
    tensors = load_file(files["a"])
    comps = copy.deepcopy(files["sd1_base"])
    assert apply_adapter(comps, "sd1", files["a"], "ok") == []
    bad = dict(tensors)
    bad[f"{Q}.lora_up.weight"] = torch.zeros(16, 4)
    lf = read_lora_file(files["a"])
    lf.modules[Q] = {**lf.modules[Q], "up": bad[f"{Q}.lora_up.weight"]}
    assert apply_adapter(comps, "sd1", lf, "bad") == [f"{Q} (shape mismatch: file [16, 32] vs model [32, 32])"]
