"""Caption tags (trainer.data.captions): kohya's keep_tokens / tag shuffle / tag dropout, the random draws they
make, the keep_tokens check, and the config fields that set them."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from trainer.config import TrainConfig
from trainer.data.captions import check_keep_tokens, join_tags, split_tags, transform_caption
from trainer.errors import ConfigError, TrainerError

CAPTION = "zkw, 1girl, red hair, smile, outdoors, sky, tree, hat, dress, flowers, looking at viewer"
TAGS = split_tags(CAPTION)


def tools(shuffle: bool = True, keep: int = 1, dropout: float = 0.0) -> dict:
    return {"shuffle_tags": shuffle, "keep_tokens": keep, "tag_dropout": dropout}


def test_split_and_join_tags():
    assert split_tags(" a, b ,, c,  ,") == ["a", "b", "c"]
    assert split_tags("") == [] and split_tags(" , ") == []
    assert join_tags(["a", "b c"]) == "a, b c"
    assert join_tags(split_tags("a,b ,c")) == "a, b, c"


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_shuffle_keeps_the_first_tags_in_place_and_moves_the_rest(keep):
    orders = set()
    for seed in range(200):
        tags = split_tags(transform_caption(CAPTION, random.Random(seed), **tools(keep=keep)))
        assert tags[:keep] == TAGS[:keep]
        assert sorted(tags) == sorted(TAGS)            # nothing lost or duplicated without dropout
        orders.add(tuple(tags[keep:]))
    assert len(orders) > 100                           # the rest really is shuffled


def test_dropout_spares_kept_tags_and_drops_about_its_rate():
    dropped = Counter()
    draws = 1000
    for seed in range(draws):
        out = transform_caption(CAPTION, random.Random(seed), **tools(shuffle=False, keep=2, dropout=0.3))
        tags = split_tags(out)
        assert tags[:2] == TAGS[:2]
        assert tags == [t for t in TAGS if t in tags]  # shuffle off: survivors keep their order
        dropped.update(t for t in TAGS[2:] if t not in tags)
    rate = sum(dropped.values()) / (draws * len(TAGS[2:]))
    assert abs(rate - 0.3) < 0.1, rate
    assert all(abs(dropped[t] / draws - 0.3) < 0.1 for t in TAGS[2:]), dropped   # every tag, not just some


def test_keep_tokens_beyond_the_caption_keeps_it_whole():
    out = transform_caption("zkw, smile", random.Random(0), **tools(keep=5, dropout=0.9))
    assert out == "zkw, smile"


def test_same_seed_same_caption():
    a = [transform_caption(CAPTION, random.Random(f"7:0:{i}"), **tools(dropout=0.2)) for i in range(20)]
    b = [transform_caption(CAPTION, random.Random(f"7:0:{i}"), **tools(dropout=0.2)) for i in range(20)]
    assert a == b and len(set(a)) > 1


def test_off_returns_the_caption_byte_identical_and_draws_nothing():
    caption = "zkw ,red  hair,, smile "               # odd spacing a re-join would change
    rng = random.Random(3)
    state = rng.getstate()
    assert transform_caption(caption, rng, **tools(shuffle=False, keep=1, dropout=0.0)) is caption
    assert rng.getstate() == state


@pytest.mark.parametrize("caption,settings", [
    (CAPTION, tools()), (CAPTION, tools(shuffle=False, dropout=0.5)), ("zkw", tools(keep=3, dropout=0.9)),
    ("", tools(dropout=0.1)), (CAPTION, tools(keep=0, dropout=0.99)),
])
def test_draws_one_number_whatever_the_caption_or_settings(caption, settings):
    """Anything the caller draws afterwards (crop, flip) must not depend on the caption or these settings."""
    rng, reference = random.Random(11), random.Random(11)
    transform_caption(caption, rng, **settings)
    reference.getrandbits(64)
    assert rng.random() == reference.random()


def test_transform_rejects_impossible_settings():
    with pytest.raises(TrainerError) as err:
        transform_caption(CAPTION, random.Random(0), **tools(dropout=1.0))
    assert err.value.field == "tag_dropout"
    with pytest.raises(TrainerError) as err:
        transform_caption(CAPTION, random.Random(0), **tools(keep=-1))
    assert err.value.field == "keep_tokens"


def test_check_keep_tokens_names_the_image_the_value_and_the_fix():
    captions = {"a.png": "zkw, smile, hat", "b.png": "zkw", "c.png": ""}
    with pytest.raises(TrainerError) as err:
        check_keep_tokens(captions, 2, shuffle_tags=True, tag_dropout=0.0)
    assert err.value.field == "keep_tokens"
    message = str(err.value)
    assert "'b.png'" in message and "1 tag" in message and "keep_tokens = 2" in message
    assert "lower keep_tokens to 0" in message                 # c.png has none: the fewest of any caption
    with pytest.raises(TrainerError, match="b.png"):
        check_keep_tokens(captions, 2, shuffle_tags=False, tag_dropout=0.1)


def test_check_keep_tokens_passes_when_it_fits_or_nothing_moves():
    captions = {"a.png": "zkw, smile, hat", "b.png": "zkw"}
    check_keep_tokens(captions, 1, shuffle_tags=True, tag_dropout=0.1)
    check_keep_tokens(captions, 5, shuffle_tags=False, tag_dropout=0.0)   # kohya keeps the caption whole
    check_keep_tokens({}, 3, shuffle_tags=True, tag_dropout=0.0)


# --- the config fields -------------------------------------------------------------------------
def test_caption_tool_defaults_are_valid_and_off():
    config = TrainConfig()
    assert (config.shuffle_tags, config.keep_tokens, config.tag_dropout) == (False, 0, 0.0)
    assert config.caption_extension == ".txt" and config.validate() == {}
    assert TrainConfig(shuffle_tags=True, keep_tokens=1, tag_dropout=0.1,
                       caption_extension=".caption").validate() == {}


@pytest.mark.parametrize("field,value,words", [
    ("keep_tokens", -1, ["-1", "0 or more"]),
    ("tag_dropout", 1.0, ["1.0", "[0, 1)"]),
    ("tag_dropout", -0.1, ["-0.1", "[0, 1)"]),
    ("caption_extension", "txt", ["'txt'", "starts with '.'", ".caption"]),
    ("caption_extension", ".", ["'.'", "starts with '.'"]),
    ("caption_extension", "./x", ["'./x'", "no '/'"]),
    ("caption_extension", ".a\\b", ["a\\\\b", "no '/'"]),
])
def test_caption_tool_fields_validated(field, value, words):
    errors = TrainConfig(**{field: value}).validate()
    assert list(errors) == [field]
    for word in words:
        assert word in errors[field], errors
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{field: value}).check()
    assert err.value.field == field
