"""TrainConfig: the one typed configuration shared by the CLI, the web UI, presets and saved runs.

Resolution order: defaults -> preset overlay -> explicit overrides. ``validate`` returns
errors keyed by field; ``check`` raises them as one ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, TrainerError

CONFIG_VERSION = 1

# Module name suffixes (PEFT ``target_modules`` style, matched against full module paths).
UNET_CROSS_ATTENTION = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
TEXT_ENCODER_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
# Named target sets (``--unet-targets cross-attn,ff`` / ``--text-encoder-targets all``), expanded to suffixes.
UNET_SELF_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
UNET_TARGET_SETS = {
    "cross-attn": UNET_CROSS_ATTENTION,
    "attn": UNET_SELF_ATTENTION + UNET_CROSS_ATTENTION,
    "ff": UNET_FEED_FORWARD,
    "all": UNET_SELF_ATTENTION + UNET_CROSS_ATTENTION + UNET_FEED_FORWARD + ("proj_in", "proj_out"),
}
TEXT_ENCODER_TARGET_SETS = {"attn": TEXT_ENCODER_ATTENTION, "all": TEXT_ENCODER_ATTENTION + ("mlp.fc1", "mlp.fc2")}
# LoCon: the ResNet 3x3 convs, their 1x1 shortcuts and the down/up samplers, a group of its own (conv_rank).
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
# Projector layers: modules that carry one modality's features into another's space (see network.lora.find_projectors).
PROJECTOR_KINDS = ("encoder_hid_proj", "add_embedding", "text_projection")
# Network types, all built by PEFT (LoraConfig, LoraConfig(use_dora=True), LoHaConfig, LoKrConfig); see network.lora.
NETWORK_TYPES = ("lora", "dora", "loha", "lokr")

MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy", "lion", "schedule_free_adamw")  # = loop.optimizers
ARCHS = ("auto", "sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")


def _section(name: str):
    """A field factory for one section of the settings form: ``_network(16, "help the UI shows")``.
    Help text, section and choices live in the field's metadata (see ``field_info``)."""
    def setting(default: Any, help: str = "", *, choices: tuple[str, ...] = ()) -> Any:
        meta = {"section": name, "help": help, "choices": tuple(choices)}
        if isinstance(default, list):
            return field(default_factory=lambda: list(default), metadata=meta)
        return field(default=default, metadata=meta)
    return setting


_model = _section("base model")
_data = _section("dataset")
_buckets = _section("buckets and caches")
_output = _section("output")
_network = _section("network")
_optim = _section("optimisation")
_sampling = _section("sampling during training")
_valid = _section("validation")


@dataclass
class TrainConfig:
    """Every setting of a training run, with the default used for 30-50 images."""

    version: int = CONFIG_VERSION

    # --- base model -------------------------------------------------------------------
    model: str = _model("builtin", '"builtin", a diffusers folder, a .safetensors/.ckpt file, or a hub id')
    arch: str = _model("auto", "auto-detect, or force sd1 / sd2 / sdxl", choices=ARCHS)
    prediction_type: str = _model(
        "auto", "auto-detect (v_prediction for SD2-768), or force", choices=PREDICTION_TYPES)
    clip_skip: int = _model(0, "condition on the text encoder's layer N from the end (A1111/kohya clip skip; "
                               "2 for anime models); 0 or 1 = last layer; SD1/SD2 only")
    max_token_length: int = _model(75, "caption tokens the text encoder sees: 75, 150 or 225 (longer captions "
                                       "are encoded in chunks of 75, as kohya does)")

    # --- dataset ----------------------------------------------------------------------
    data_dir: str = _data("", "images + same-stem .txt captions (kohya convention)")
    trigger_word: str = _data("", "prepended to every caption; used alone when a caption is missing")
    resolution: int = _data(0, "square training size in pixels (multiple of 8); 0 = the model's native size")
    center_crop: bool = _data(True, "centre crop after resizing the short side; False = random crop")
    random_flip: bool = _data(False, "horizontal flip augmentation (off: breaks asymmetric subjects)")
    repeats: int = _data(1, "each image is seen this many times per epoch")
    caption_dropout: float = _data(0.0, "probability of training on an empty caption")
    shuffle_tags: bool = _data(False, "shuffle the comma-separated tags of each caption every epoch (kohya)")
    keep_tokens: int = _data(0, "tags kept first and fixed when shuffling/dropping; 1 keeps the trigger word")
    tag_dropout: float = _data(0.0, "probability of dropping each tag after the kept ones; 0 = off, 0.1 typical")
    caption_extension: str = _data(".txt", "file extension of the caption files beside the images, e.g. .caption")
    reg_data_dir: str = _data("", "regularisation (class) images with their own captions; empty = none")
    prior_loss_weight: float = _data(1.0, "loss weight of the regularisation images")

    # --- buckets and caches -----------------------------------------------------------
    enable_buckets: bool = _buckets(True, "aspect-ratio buckets; off = every image square-cropped to the resolution")
    bucket_step: int = _buckets(0, "bucket sides are multiples of this (0 = 64, or resolution/8 for small models)")
    min_bucket_reso: int = _buckets(0, "shortest bucket side in px (0 = half the resolution)")
    max_bucket_reso: int = _buckets(0, "longest bucket side in px (0 = twice the resolution)")
    bucket_no_upscale: bool = _buckets(False, "small images get a bucket of their own size instead of being enlarged")
    cache_latents: bool = _buckets(True, "encode each image through the VAE once, not every step (fixed crops only)")
    cache_to_disk: bool = _buckets(True, "keep the latent cache on disk so later runs on the same images reuse it")
    cache_dir: str = _buckets("", "folder of the disk cache (empty = <run folder>/cache)")
    cache_text_encoder_outputs: bool = _buckets(
        True, "encode each caption once when no text encoder trains and captions do not change per epoch")

    # --- output -----------------------------------------------------------------------
    output_dir: str = _output("outputs", "the run folder: adapter, config, samples, checkpoints")
    name: str = _output("lora", "file stem of the exported adapter")
    save_every_n_steps: int = _output(0, "intermediate adapters (0 = only at the end)")
    checkpoint_every_n_steps: int = _output(
        250, "training-state checkpoints to resume from after any stop or crash (0 = only when stopped)")
    keep_checkpoints: int = _output(2, "newest checkpoints kept; older ones are deleted once a new one is complete")
    save_precision: str = _output("fp16", "dtype of the exported adapter's weights (alphas stay fp32)",
                                  choices=SAVE_PRECISIONS)
    export_diffusers: bool = _output(False, "also write a diffusers/PEFT-format copy")
    export_portable: bool = _output(False, "also write <name>-portable.safetensors without projector modules")
    effect_check: bool = _output(True, "after the run, render the trigger prompts at strengths 0-1.5 and say whether "
                                       "the adapter learned anything (effect.json, effect.png; docs/EFFECT.md)")
    clip_model: str = _output("", "a local CLIP model folder: the effect check scores with CLIP image similarity "
                                  "instead of colours and edges")

    # --- network ----------------------------------------------------------------------
    rank: int = _network(16, "LoRA rank r (16-32 typical for characters and styles)")
    alpha: float = _network(8.0, "scale = alpha / r; rank/2 is the common choice")
    network: str = _network("lora", "lora; dora (LoRA + a learned magnitude per output channel); loha (Hadamard "
                            "product of two rank-r pairs); lokr (Kronecker product; rank r only where a factor is "
                            "large). Every group uses it; diffusers loads lora/dora only", choices=NETWORK_TYPES)
    use_rslora: bool = _network(False, "rank-stabilised LoRA: scale = alpha / sqrt(r) (lora/dora); the file's "
                                       "alpha is rescaled so every tool applies the same scale")
    train_unet: bool = _network(True)
    unet_targets: list[str] = _network(list(UNET_CROSS_ATTENTION))
    conv_rank: int = _network(0, "LoCon: LoRA on the UNet's ResNet convs and samplers with this rank; 0 = off")
    conv_alpha: float = _network(0.0, "0 = same as conv_rank")
    train_text_encoder: bool = _network(False)
    text_encoder_rank: int = _network(0, "0 = same as rank")
    text_encoder_alpha: float = _network(0.0, "0 = same as alpha")
    text_encoder_lr: float = _network(5e-5)
    text_encoder_targets: list[str] = _network(list(TEXT_ENCODER_ATTENTION))
    train_projector: bool = _network(False, "projector layers: encoder_hid_proj, add_embedding, text_projection")
    projector_rank: int = _network(0, "0 = same as rank")
    projector_alpha: float = _network(0.0, "0 = same as alpha")
    projector_lr: float = _network(1e-4)
    projector_targets: list[str] = _network([], "empty = all the model has; else module paths")

    # --- optimisation -----------------------------------------------------------------
    learning_rate: float = _optim(1e-4, "UNet LoRA learning rate")
    max_train_steps: int = _optim(0, "optimizer steps; 0 = derive from epochs")
    epochs: int = _optim(10)
    batch_size: int = _optim(1)
    gradient_accumulation_steps: int = _optim(1)
    optimizer: str = _optim("adamw", "adamw; adamw8bit, adafactor, prodigy, lion, schedule_free_adamw need their "
                            "package (pip install -e \".[optimizers]\")", choices=OPTIMIZERS)
    weight_decay: float = _optim(1e-2)
    adam_beta1: float = _optim(0.9)
    adam_beta2: float = _optim(0.999)
    adam_epsilon: float = _optim(1e-8)
    max_grad_norm: float = _optim(1.0, "0 disables clipping")
    lr_scheduler: str = _optim("cosine", "diffusers' schedules; the warm-up comes first", choices=LR_SCHEDULERS)
    lr_scheduler_num_cycles: int = _optim(1, "restarts of cosine_with_restarts")
    lr_scheduler_power: float = _optim(1.0, "power of the polynomial schedule")
    lr_warmup_steps: int = _optim(0)
    mixed_precision: str = _optim(
        "auto", "auto / no / fp16 / bf16 for the frozen weights (LoRA stays fp32); auto: bf16 on GPUs that have "
        "it, fp16 on older ones, bf16 on CPUs with native bf16 for SD-size models, else fp32", choices=MIXED_PRECISIONS)
    gradient_checkpointing: bool = _optim(False, "recompute activations in the backward pass: much less memory, "
                                          "~30% slower")
    torch_compile: bool = _optim(False, "compile the UNet with torch.compile (GPU: faster steps after a "
                                 "minute or more of compiling)")
    channels_last: bool = _optim(False, "UNet in channels-last memory format (faster convolutions on NVIDIA "
                                 "GPUs with fp16/bf16)")
    cpu_threads: int = _optim(0, "torch CPU threads; 0 = the physical cores, shared with other running jobs")
    min_snr_gamma: float = _optim(5.0, "min-SNR loss weighting; 0 disables")
    zero_terminal_snr: bool = _optim(False, "rescale the noise schedule to reach SNR 0 (v-prediction models only)")
    ema_decay: float = _optim(0.0, "EMA of the LoRA weights, exported instead of the last ones (0.999 typical)")
    ema_on_cpu: bool = _optim(False, "keep the EMA copy in CPU memory instead of on the training device")
    noise_offset: float = _optim(0.0, "0.05-0.1 helps very dark/bright images")
    seed: int = _optim(42)

    # --- sampling during training -----------------------------------------------------
    sample_every_n_steps: int = _sampling(0, "0 = no samples during training")
    sample_prompts: list[str] = _sampling([])
    sample_steps: int = _sampling(20)
    sample_guidance: float = _sampling(7.0)

    # --- validation -------------------------------------------------------------------
    validation_split: float = _valid(0.0, "images held out for a validation loss: a share (0.1) or a count (5)")
    validation_dir: str = _valid("", "a folder of validation images with captions, instead of validation_split")
    validate_every_n_steps: int = _valid(0, "0 = ten evaluations per run (and one before training)")

    # ---------------------------------------------------------------------------------
    def validate(self) -> dict[str, str]:
        """Return ``{field: message}`` for every invalid field (empty when valid); the rules are in ``checks``."""
        from .checks import config_errors
        return config_errors(self)

    def check(self) -> "TrainConfig":
        errors = self.validate()
        if errors:
            raise ConfigError(errors)
        return self

    # --- derived values ---------------------------------------------------------------
    @property
    def text_encoding(self) -> dict[str, int]:
        """How captions are encoded (``encode_prompts`` / ``RenderSettings`` keywords)."""
        return {"clip_skip": self.clip_skip, "max_token_length": self.max_token_length}

    @property
    def te_rank(self) -> int:
        return self.text_encoder_rank or self.rank

    @property
    def te_alpha(self) -> float:
        return self.text_encoder_alpha or self.alpha

    @property
    def proj_rank(self) -> int:
        return self.projector_rank or self.rank

    @property
    def proj_alpha(self) -> float:
        return self.projector_alpha or self.alpha

    # --- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def replace(self, **overrides: Any) -> "TrainConfig":
        return from_dict({**self.to_dict(), **overrides})

    def save(self, path: str | Path) -> Path:
        from .fileio import atomic_write_text
        return atomic_write_text(Path(path), self.to_json() + "\n")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def field_info(name: str) -> tuple[str, str, tuple[str, ...]]:
    """(section, help, choices) of a TrainConfig field, from its metadata ("" / () where it has none)."""
    meta = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}[name]
    return meta.get("section", ""), meta.get("help", ""), tuple(meta.get("choices", ()))


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Convert a preset/CLI/UI value to the type of the field's default."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError(value)
            return [str(v) for v in value]
        if isinstance(value, (dict, list)):
            raise TypeError(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        kind = type(default).__name__
        raise ConfigError({name: f"{value!r} is not a valid {kind}."}) from None


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a saved config of an older version up to ``CONFIG_VERSION``."""
    data = dict(data)
    raw = data.get("version", CONFIG_VERSION)
    try:
        version = int(raw)
    except (TypeError, ValueError, OverflowError):
        raise TrainerError(f"Config version {raw!r} is not a whole number; a saved config.json has \"version\": "
                           f"{CONFIG_VERSION}. Fix it or save the config again.", field="version") from None
    if version > CONFIG_VERSION:
        raise TrainerError(
            f"Config version {version} is newer than this trainer understands ({CONFIG_VERSION}); "
            "update the trainer.", field="version")
    data["version"] = CONFIG_VERSION
    return data


def load_config(path: str | Path) -> TrainConfig:
    """A saved config.json (``TrainConfig.save``) as a TrainConfig; TrainerError naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:
        raise TrainerError(f"Config file '{path}' cannot be read ({err}); give a config.json written by an earlier "
                           "run.", field="config") from None
    return from_dict(data)


def from_dict(data: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Overlay ``data`` on ``base`` (defaults when None); unknown keys are an error."""
    if not isinstance(data, dict):
        raise TrainerError(f"Settings must be a table of field = value, not {type(data).__name__} "
                           f"({str(data)[:60]!r}); see TrainConfig for the fields.", field="config")
    data = migrate(data) if "version" in data else dict(data)
    base = base or TrainConfig()
    defaults = base.to_dict()
    unknown = sorted(set(data) - set(defaults) - {"description"})
    if unknown:
        raise ConfigError({k: "is not a setting; check the spelling (see TrainConfig)." for k in unknown})
    values = dict(defaults)
    for k, v in data.items():
        if k == "description":
            continue
        values[k] = _coerce(k, v, defaults[k])
    return TrainConfig(**values)


def resolve(preset: str | None = None, overrides: dict[str, Any] | None = None,
            base: TrainConfig | None = None) -> TrainConfig:
    """defaults (or ``base``) -> preset -> overrides (None values ignored), validated."""
    config = base or TrainConfig()
    if preset:
        config = from_dict(load_preset(preset), config)
    if overrides:
        config = from_dict({k: v for k, v in overrides.items() if v is not None}, config)
    return config.check()


# Presets (shipped in the package, and a user's folder) live in presetio.py; these names are part of this module's API.
from .presetio import (PRESETS_DIR, check_preset_name, list_presets, load_preset,  # noqa: E402,F401
                       save_preset)
