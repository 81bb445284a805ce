"""Caption tags, kohya style: split and join comma-separated tags, and the per-sample tag shuffle and tag
dropout that keep the first ``keep_tokens`` tags (the trigger word, usually) fixed in place.
"""
from __future__ import annotations

import random

from ..errors import TrainerError

__all__ = ["check_keep_tokens", "join_tags", "split_tags", "transform_caption"]

SEPARATOR = ", "


def split_tags(caption: str) -> list[str]:
    """The comma-separated tags of ``caption``, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def join_tags(tags: list[str]) -> str:
    return SEPARATOR.join(tags)


def transform_caption(caption: str, rng: random.Random, *, shuffle_tags: bool, keep_tokens: int,
                      tag_dropout: float) -> str:
    """The caption one training sample sees: the first ``keep_tokens`` tags stay first, in order, and are
    never dropped; each other tag is dropped with probability ``tag_dropout``, and the survivors are
    shuffled when ``shuffle_tags`` (kohya's ``keep_tokens``, ``caption_tag_dropout_rate`` and
    ``shuffle_caption``). A caption with no more than ``keep_tokens`` tags keeps them all.

    With shuffle off and dropout 0 the caption comes back unchanged (not re-joined) and nothing is drawn
    from ``rng``. Otherwise exactly one value is drawn (``rng.getrandbits(64)``), whatever the caption, its
    length, the settings or which tags are dropped; it seeds a private RNG for the dropout (one draw per
    tag after the kept ones) and the shuffle, so draws the caller makes after this one do not depend on
    the caption. An empty result is ""; the tags of a transformed caption are joined with ", ".
    """
    if not shuffle_tags and tag_dropout <= 0:
        return caption
    if keep_tokens < 0:
        raise TrainerError(f"keep_tokens {keep_tokens} must be 0 or more.", field="keep_tokens")
    if not 0 <= tag_dropout < 1:
        raise TrainerError(f"tag_dropout {tag_dropout} must be in [0, 1); 0.1 is a common choice.",
                           field="tag_dropout")
    own = random.Random(rng.getrandbits(64))
    tags = split_tags(caption)
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout > 0:
        draws = [own.random() for _ in flex]
        flex = [tag for tag, draw in zip(flex, draws) if draw >= tag_dropout]
    if shuffle_tags:
        own.shuffle(flex)
    return join_tags(fixed + flex)


def check_keep_tokens(captions: dict[str, str], keep_tokens: int, *, shuffle_tags: bool,
                      tag_dropout: float) -> None:
    """Refuse ``keep_tokens`` larger than the tag count of a caption (``{image name: caption}``), naming the
    first such image; only when shuffle or tag dropout is on, since otherwise the whole caption stays
    fixed anyway."""
    if keep_tokens <= 0 or (not shuffle_tags and tag_dropout <= 0):
        return
    counts = {name: len(split_tags(caption)) for name, caption in captions.items()}
    short = next((name for name, n in counts.items() if n < keep_tokens), None)
    if short is None:
        return
    n, fewest = counts[short], min(counts.values())
    raise TrainerError(
        f"The caption of '{short}' has {n} tag{'s' if n != 1 else ''}, fewer than keep_tokens = {keep_tokens}; "
        f"lower keep_tokens to {fewest} (the fewest tags of any caption) or add tags to that caption.",
        field="keep_tokens")
