"""Text conditioning: CLIP encoding of captions and prompts with clip skip and captions longer than 75
tokens (kohya sd-scripts semantics), shared by training, preview and generation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import TrainerError

if TYPE_CHECKING:
    from .loader import BaseModel

__all__ = ["CHUNK", "MAX_TOKEN_LENGTHS", "MAX_CLIP_SKIP", "check_conditioning", "chunk_ids", "encode_text",
           "prompt_kwargs"]

CHUNK = 75                            # caption tokens per encoder pass; with BOS and EOS the encoder's 77
MAX_TOKEN_LENGTHS = (75, 150, 225)    # sd-scripts' --max_token_length choices (75 = its default, unset)
MAX_CLIP_SKIP = 12                    # SD1's encoder has 12 layers


def check_conditioning(base: "BaseModel", clip_skip: int, max_token_length: int) -> None:
    """Refuse settings this model cannot be conditioned with; each message names the field, value and fix."""
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise TrainerError(f"max_token_length {max_token_length} is not one of 75, 150, 225; use 75 (the default) "
                           "or 150/225 for captions longer than 75 tokens.", field="max_token_length")
    if not 0 <= clip_skip <= MAX_CLIP_SKIP:
        raise TrainerError(f"clip_skip {clip_skip} must be between 0 and {MAX_CLIP_SKIP}; use 0 (off) or 2 "
                           "(the usual value for anime models).", field="clip_skip")
    if clip_skip > 1 and base.arch == "sdxl":
        raise TrainerError(f"clip_skip {clip_skip} does not apply to SDXL: it is always conditioned on the "
                           "penultimate layer of its encoders (sd-scripts ignores clip skip for SDXL); set "
                           "clip_skip to 0.", field="clip_skip")
    layers = base.text_encoders[0].config.num_hidden_layers
    if clip_skip > layers:
        raise TrainerError(f"clip_skip {clip_skip} is more than the {layers} layers of this model's text encoder; "
                           f"use a value from 0 to {layers} (2 is the usual one).", field="clip_skip")


def chunk_ids(tokenizer, captions: list[str], max_token_length: int = CHUNK) -> torch.Tensor:
    """Token ids [B, n, 77], n = max_token_length // 75: each caption's first ``max_token_length`` tokens in
    chunks of 75, each chunk as ``BOS tokens EOS pad...``; a chunk past the caption's end is ``BOS EOS pad...``.

    With n = 1 this is the pipelines' own tokenization (truncated at 75 tokens, padded to 77). For longer
    captions it gives the chunks sd-scripts builds, its fix-ups for pad != EOS tokenizers (SD2, SDXL's second
    encoder) included: a full chunk ends in EOS, an empty one starts ``BOS EOS``.
    """
    n = max_token_length // CHUNK
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    tokens = tokenizer(list(captions), add_special_tokens=False, truncation=True,
                       max_length=max_token_length).input_ids
    rows = [[bos, *part, eos] + [pad] * (CHUNK - len(part))
            for ids in tokens for part in (ids[k * CHUNK:(k + 1) * CHUNK] for k in range(n))]
    return torch.tensor(rows, dtype=torch.long).view(len(tokens), n, CHUNK + 2)


def _merge_chunks(states: torch.Tensor, batch: int) -> torch.Tensor:
    """[B*n, 77, D] -> [B, 75n + 2, D] as sd-scripts joins chunks: BOS of the first chunk, the 75 middle
    positions of every chunk, the last position (EOS or pad) of the last chunk. n = 1 is left as it is."""
    states = states.view(batch, -1, CHUNK + 2, states.shape[-1])
    if states.shape[1] == 1:
        return states[:, 0]
    middle = states[:, :, 1:-1].reshape(batch, -1, states.shape[-1])
    return torch.cat([states[:, 0, :1], middle, states[:, -1, -1:]], dim=1)


def _final_layer_norm(encoder) -> torch.nn.Module:
    """The CLIP text model's final LayerNorm (transformers < 5 nests it under ``text_model``)."""
    return getattr(encoder, "text_model", encoder).final_layer_norm


def encode_text(base: "BaseModel", captions: list[str], *, clip_skip: int = 0,
                max_token_length: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states [B, 75n + 2, D], SDXL pooled embedding [B, P] or None), with autograd.

    SD1/SD2: the last hidden state, or with ``clip_skip`` N >= 2 ``final_layer_norm(hidden_states[-N])``
    (A1111 and sd-scripts; 0 and 1 both mean the last layer). SDXL: penultimate hidden states of both
    encoders without final norm, concatenated on the feature axis; ``clip_skip`` > 1 is refused.
    """
    check_conditioning(base, clip_skip, max_token_length)
    captions = list(captions)
    states, pooled = [], None
    for tokenizer, encoder in zip(base.tokenizers, base.text_encoders):
        ids = chunk_ids(tokenizer, captions, max_token_length).flatten(0, 1).to(encoder.device)
        if base.arch != "sdxl" and clip_skip <= 1:
            hidden = encoder(ids)[0]
        elif base.arch != "sdxl":
            out = encoder(ids, output_hidden_states=True)
            hidden = _final_layer_norm(encoder)(out.hidden_states[-clip_skip])
        else:
            out = encoder(ids, output_hidden_states=True)
            hidden = out.hidden_states[-2]
            # text_embeds of the projection model (the last encoder), pooled at each chunk's EOS. sd-scripts
            # keeps the first chunk's pool for long captions (pool2[::n]), so do we: it is also the pool of
            # the 75-token truncation of the caption.
            pooled = out[0].view(len(captions), -1, out[0].shape[-1])[:, 0]
        states.append(_merge_chunks(hidden, len(captions)))
    return (states[0] if len(states) == 1 else torch.cat(states, dim=-1)), pooled


def prompt_kwargs(base: "BaseModel", prompt: str, negative_prompt: str = "", *, clip_skip: int = 0,
                  max_token_length: int = CHUNK, zero_empty_negative: bool = True) -> dict:
    """The prompt arguments of a diffusers SD/SDXL pipeline call conditioned as training is.

    Defaults (clip skip off, 75 tokens): the texts themselves, so the pipeline encodes them as it always
    has. Otherwise embeddings from ``encode_text``; prompt and negative always have the same length, since
    both are encoded in max_token_length // 75 chunks (empty chunks encode as ``BOS EOS pad...``, as
    sd-scripts pads). ``zero_empty_negative``: the SDXL pipeline's ``force_zeros_for_empty_prompt``, under
    which it conditions an empty negative prompt on zeros; it does so for embeddings too.
    """
    check_conditioning(base, clip_skip, max_token_length)
    if clip_skip <= 1 and max_token_length == CHUNK:
        return {"prompt": prompt, "negative_prompt": negative_prompt or None}
    sdxl = base.arch == "sdxl"
    states, pooled = encode_text(base, [prompt], clip_skip=clip_skip, max_token_length=max_token_length)
    kwargs = {"prompt_embeds": states, **({"pooled_prompt_embeds": pooled} if sdxl else {})}
    if sdxl and zero_empty_negative and not negative_prompt:
        return kwargs
    states, pooled = encode_text(base, [negative_prompt or ""], clip_skip=clip_skip,
                                 max_token_length=max_token_length)
    kwargs["negative_prompt_embeds"] = states
    if sdxl:
        kwargs["negative_pooled_prompt_embeds"] = pooled
    return kwargs
