"""Rendering images with a base model and zero or more LoRA files at chosen strengths.

``Renderer`` keeps one model loaded; adapters are attached once and their strengths change
without reloading anything (the preview slider and blending rely on this).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files.adapters import apply_adapter, lora_shapes, place, read_lora_file, remove_adapter, set_weights
from ..errors import TrainerError
from ..models.loader import BaseModel, load_base_model, make_pipeline
from ..models.text import check_conditioning, prompt_kwargs


@dataclass
class RenderSettings:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.0
    size: int | None = None            # None = the model's native resolution
    clip_skip: int = 0                 # as the run's config: 0/1 = last layer, 2 = A1111's "clip skip 2"
    max_token_length: int = 75         # 150/225: prompts longer than 75 tokens are encoded in chunks
    output_type: str = "pil"           # "np": a float array in [0, 1] (comparisons), as the pipelines take it


@dataclass
class Renderer:
    """A loaded base model plus attached adapters, keyed by their file path."""

    base: BaseModel
    sampler: str = "dpmpp"
    fuse: bool = True          # merge the active adapters into the weights for each render (base-model speed)
    _names: dict[str, str] = field(default_factory=dict)    # resolved path -> adapter name
    _pipe: object | None = None
    _attached: int = 0                                       # adapters attached so far: names are never reused

    @classmethod
    def load(cls, model: str = "builtin", *, device: str = "auto", **kwargs) -> "Renderer":
        """Load ``model``; "auto" renders on a CUDA GPU in fp16 when there is one, else CPU fp32."""
        base = load_base_model(model, **kwargs)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device != "cpu":
            base.to(device, torch.float16 if device.startswith("cuda") else None)
        return cls(base)

    @property
    def pipeline(self):
        if self._pipe is None:
            self._pipe = make_pipeline(self.base, self.sampler)
        return self._pipe

    def attach(self, path: str | Path) -> str:
        """Load a LoRA file once; returns its adapter name (unique for this renderer, so a detached
        adapter's name is never given to another file). A file that does not fit is refused, naming why."""
        key = str(Path(path).resolve())
        if key not in self._names:
            lora = read_lora_file(path)
            components = self.base.components()
            placement = place(components, self.base.arch, lora_shapes(lora))
            if placement.refusal(Path(path).name, self.base.arch, lora.unsupported):
                raise TrainerError(placement.refusal(Path(path).name, self.base.arch, lora.unsupported,
                                                     file_arch=_file_arch(path)), field="lora")
            name = f"lora{self._attached}"
            self._attached += 1
            apply_adapter(components, self.base.arch, lora, name, weight=0.0)
            self._names[key] = name
        return self._names[key]

    def detach(self, path: str | Path) -> None:
        name = self._names.pop(str(Path(path).resolve()), None)
        if name:
            remove_adapter(self.base.components(), name)

    def set_strengths(self, loras: dict[str, float]) -> None:
        """Attach what is new, then set every attached adapter's weight (absent ones to 0)."""
        wanted = {self.attach(p): float(w) for p, w in loras.items()}
        set_weights(self.base.components(), {n: wanted.get(n, 0.0) for n in self._names.values()})

    @torch.no_grad()
    def render(self, settings: RenderSettings, loras: dict[str, float] | None = None):
        """One PIL image for ``settings`` with ``loras`` ({path: weight}) applied."""
        check_conditioning(self.base, settings.clip_skip, settings.max_token_length)
        self.set_strengths(loras or {})
        size = settings.size or self.base.resolution
        generator = torch.Generator(device="cpu").manual_seed(settings.seed)
        pipe = self.pipeline
        prompts = prompt_kwargs(self.base, settings.prompt, settings.negative_prompt,
                                clip_skip=settings.clip_skip, max_token_length=settings.max_token_length,
                                zero_empty_negative=bool(pipe.config.get("force_zeros_for_empty_prompt")))
        with fused(self.base.components()) if self.fuse else contextlib.nullcontext():
            return pipe(**prompts, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                        height=size, width=size, generator=generator, output_type=settings.output_type).images[0]


@contextlib.contextmanager
def fused(components: dict[str, torch.nn.Module]):
    """The active adapters merged into their base weights at their current strengths for the duration (one
    matmul per layer, then every denoising step runs at the base model's speed), and the base weights put back
    exactly afterwards (copied, not un-merged, so repeated previews never drift)."""
    from ..network.layers import tuner_layers

    saved = []
    try:
        for model in components.values():
            for layer in tuner_layers(model):
                if layer.merged or not [a for a in layer.active_adapters if a in _names_of(layer)]:
                    continue
                base = layer.get_base_layer()
                saved.append((layer, base, base.weight.detach().clone(),
                              None if base.bias is None else base.bias.detach().clone()))
                layer.merge(adapter_names=[a for a in layer.active_adapters if a in _names_of(layer)])
        yield
    finally:
        with torch.no_grad():
            for layer, base, weight, bias in saved:
                layer.merged_adapters.clear()
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)


def _names_of(layer) -> set[str]:
    from ..network.layers import adapters_of
    return adapters_of(layer)


def _file_arch(path: str | Path) -> str | None:
    """The architecture a LoRA file's keys imply (for the refusal message), None when unreadable."""
    from ..files.deltas import read_network_file
    from ..files.inspect import guess_architecture
    try:
        return guess_architecture(read_network_file(path))[0]
    except TrainerError:
        return None


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'file.safetensors:0.7' -> (path, 0.7); no weight -> 1.0. Windows drive colons are kept."""
    path, sep, weight = text.rpartition(":")
    if sep and path and not weight.startswith(("\\", "/")):
        try:
            return path, float(weight)
        except ValueError:
            raise TrainerError(f"LoRA weight {weight!r} in {text!r} is not a number; "
                               "write FILE:0.8.", field="lora") from None
    return text, 1.0
