"""TrainConfig validation, presets overlay order, (de)serialisation."""
import json

import pytest

from trainer.config import TrainConfig, from_dict, list_presets, load_preset, resolve, save_preset
from trainer.errors import ConfigError, TrainerError


def test_defaults_are_valid():
    assert TrainConfig().validate() == {}


@pytest.mark.parametrize("field,value,words", [
    ("rank", 0, ["rank", "0", "1 or more"]),
    ("alpha", -1.0, ["alpha", "-1", "greater than 0"]),
    ("resolution", 500, ["resolution", "500", "multiple of 8", "504"]),
    ("mixed_precision", "fp8", ["mixed_precision", "fp8", "bf16"]),
    ("learning_rate", 2.0, ["learning_rate", "2.0"]),
    ("name", "a/b", ["name", "a/b"]),
])
def test_invalid_field_named_with_value_and_fix(field, value, words):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{field: value}).check()
    assert err.value.field == field
    assert field in err.value.errors
    for word in words:
        assert word in str(err.value)


def test_all_errors_reported_together():
    errors = TrainConfig(rank=0, alpha=0, resolution=12).validate()
    assert set(errors) == {"rank", "alpha", "resolution"}


def test_presets_have_descriptions_and_resolve():
    presets = list_presets()
    assert {"sd15-character", "sd15-style", "sdxl-character", "quick"} <= set(presets)
    for name, description in presets.items():
        assert description.strip(), name
        resolve(name)  # every preset is a valid overlay


def test_overlay_order_defaults_preset_overrides():
    preset = load_preset("sd15-character")
    config = resolve("sd15-character", {"rank": 4, "alpha": None})
    assert config.rank == 4                       # override beats preset
    assert config.alpha == preset["alpha"]        # None override ignored, preset value kept
    assert config.seed == TrainConfig().seed      # untouched default


def test_unknown_key_and_bad_type_rejected():
    with pytest.raises(ConfigError, match="ranc"):
        from_dict({"ranc": 3})
    with pytest.raises(ConfigError, match="rank"):
        from_dict({"rank": "many"})


def test_string_values_coerced_like_cli():
    config = from_dict({"rank": "8", "train_text_encoder": "true", "sample_prompts": "a cat, a dog"})
    assert config.rank == 8 and config.train_text_encoder is True
    assert config.sample_prompts == ["a cat", "a dog"]


def test_json_round_trip_and_newer_version_refused(tmp_path):
    config = TrainConfig(rank=4, alpha=2.0, trigger_word="zkw")
    path = config.save(tmp_path / "config.json")
    assert from_dict(json.loads(path.read_text())) == config
    with pytest.raises(TrainerError, match="newer"):
        from_dict({"version": 999})


def test_missing_preset_lists_available():
    with pytest.raises(TrainerError, match="quick"):
        load_preset("does-not-exist")


def test_save_preset_keeps_only_changes(tmp_path):
    path = save_preset(TrainConfig(rank=4, data_dir="/x"), "mine", "my preset", directory=tmp_path)
    data = json.loads(path.read_text())
    assert data == {"description": "my preset", "rank": 4}
    listed = list_presets(tmp_path)              # the shipped presets and the user's folder
    assert listed["mine"] == "my preset" and set(list_presets()) == set(listed) - {"mine"}
    assert resolve(str(path)).rank == 4
