"""Preflight: a run's peak memory and time, predicted before it starts and without loading weights.

Peak = the frozen weights as trained (their dtype per component) + what one traced training step holds at its
peak (activations, gradients, optimizer state, adapter, EMA; ``trace``) + on CPU the process itself (the
resident memory of this process once torch and the model libraries are imported, as the trainer's would be).
The cache fill (one VAE and text encode per image, before step 1) peaks separately; the larger peak counts.
Time per step = the traced step's own operations, the costliest of them run on this device on random tensors of
their shapes and timed (``replay``; the rest scaled from those), plus a measured cost per small operation; the
cache fill is its FLOPs over this device's measured throughput; model loading is not included.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from ..config import TrainConfig
from ..errors import TrainerError
from . import precision, replay
from .trace import meta_model, model_configs, trace_step

__all__ = ["Estimate", "estimate", "estimate_with_alternatives", "free_memory", "process_rss", "device_flops"]
GIB = 2 ** 30


@dataclass
class Estimate:
    device: str                          # "cpu" or "cuda"
    memory_kind: str                     # "resident memory (RSS)" or "CUDA memory"
    peak_bytes: int
    step_seconds: float
    total_seconds: float
    steps: int
    resolution: int
    free_bytes: int | None               # memory available now (None: unknown)
    parts: dict[str, int] = field(default_factory=dict)       # what the peak is made of, bytes
    assumptions: list[str] = field(default_factory=list)
    change: str = ""                     # for an alternative: the setting changed ("batch_size 1")

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.peak_bytes <= self.free_bytes

    def summary(self) -> str:
        free = f" of {self.free_bytes / GIB:.1f} GiB free" if self.free_bytes is not None else ""
        return (f"peak {self.memory_kind} ~{self.peak_bytes / GIB:.1f} GiB{free}; ~{_duration(self.step_seconds)} "
                f"per step, ~{_duration(self.total_seconds)} for {self.steps} steps")

    def to_json(self) -> dict:
        return {**asdict(self), "fits": self.fits}


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def process_rss() -> int:
    """This process's resident memory in bytes (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_memory(device: str) -> int | None:
    """Bytes available for a new run: CUDA free memory, or MemAvailable (what the kernel can give without
    swapping) on CPU."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


_RATES: dict[tuple[str, torch.dtype], float] = {}


def device_flops(device: str, dtype: torch.dtype) -> float:
    """Measured FLOP/s of this device on the UNet's two kinds of work (a 3x3 convolution and a matrix
    multiply of typical sizes), in ``dtype``; measured once per process."""
    key = (device, dtype)
    if key not in _RATES:
        dev = torch.device(device)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        x = torch.randn(1, 320, 32, 32, device=dev, dtype=dtype)
        w = torch.randn(320, 320, 3, 3, device=dev, dtype=dtype)
        a = torch.randn(1024, 1024, device=dev, dtype=dtype)
        work = [(lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * 320 * 320 * 9 * 32 * 32),
                (lambda: a @ a, 2 * 1024 ** 3)]
        rates = []
        for fn, flops in work:
            fn()
            sync()
            n, t0 = 0, time.perf_counter()
            while n < 3 or time.perf_counter() - t0 < 0.15:
                fn()
                n += 1
            sync()
            rates.append(n * flops / (time.perf_counter() - t0))
        _RATES[key] = math.exp(sum(math.log(r) for r in rates) / len(rates))
    return _RATES[key]


_OVERHEAD: dict[str, float] = {}


def op_overhead(device: str) -> float:
    """Measured seconds of one small tensor operation on ``device`` (dispatch, autograd bookkeeping, kernel
    launch): what dominates the step of a small model."""
    if device not in _OVERHEAD:
        dev = torch.device(device)
        x = torch.ones(8, device=dev, requires_grad=True)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        best = math.inf
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            y = x
            for _ in range(200):
                y = y * 1.0001
            y.sum().backward()
            sync()
            best = min(best, (time.perf_counter() - t0) / 402)   # 200 forward, 200 backward, sum, its backward
        _OVERHEAD[device] = best
    return _OVERHEAD[device]


def _dataset(config: TrainConfig, resolution: int):
    """The dataset's report, scanned once (None without a dataset, or when it cannot be read and only the cache
    fill's image count would have used it)."""
    if not config.data_dir:
        return None
    from ..data.scan import scan_dataset
    try:
        return scan_dataset(config.data_dir, trigger_word=config.trigger_word, resolution=resolution,
                            caption_extension=config.caption_extension)
    except TrainerError:
        if config.max_train_steps:
            return None
        raise


def _steps(config: TrainConfig, report) -> int:
    """The run's optimizer steps: max_train_steps, or epochs over the dataset's batches."""
    from .schedules import total_steps_for_batches
    if config.max_train_steps:
        return config.max_train_steps
    if report is None:
        raise TrainerError("The estimate needs max_train_steps or a dataset (--data) to count the steps of "
                           f"{config.epochs} epoch(s).", field="data_dir")
    batches = math.ceil(report.num_samples * config.repeats / max(1, config.batch_size))
    return total_steps_for_batches(batches, config.gradient_accumulation_steps, config.epochs, 0)


def estimate(config: TrainConfig, *, device: str | None = None, baseline: int | None = None) -> Estimate:
    """The predicted peak memory and time of training ``config`` on ``device`` (default: CUDA when there is one).
    ``baseline``: the process's own memory on CPU (default: this process's resident memory now)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    arch, folder = model_configs(config.model, config.arch, config.prediction_type)
    model = meta_model(arch, folder)
    resolution = config.resolution or model.resolution
    chosen, why = precision.resolve(config.mixed_precision, model.unet, device)
    config = replace(config, resolution=resolution, mixed_precision=chosen)
    dtype = precision.DTYPES[chosen]
    trace = trace_step(config, model, dtype)
    weights = sum(trace.weight_bytes.values())
    parts = {"weights": weights, "training step": trace.step_peak}
    assumptions = [f"{arch} architecture from {folder}", f"{resolution}x{resolution} px (a bucket's area is at "
                   "most this), batch " f"{config.batch_size}", f"weights {str(dtype).split('.')[-1]} "
                   f"(mixed_precision {chosen}: {why}), "
                   f"VAE {'bf16' if dtype == torch.bfloat16 else 'fp32'}"]
    if device == "cpu":
        parts["process"] = process_rss() if baseline is None else baseline
        assumptions.append("process memory: this process's resident memory with torch and the model "
                           "libraries imported")
    else:
        assumptions.append("CUDA memory of tensors; the CUDA context (~0.3-0.5 GiB, outside torch's count) "
                           "is not included")
    encode = trace.encode_peak if (config.cache_latents and config.center_crop) else 0
    peak = weights + max(trace.step_peak, encode) + parts.get("process", 0)
    rate = device_flops(device, dtype)
    step_s, timed_share = replay.step_seconds(trace.op_log, trace.trace_steps, device, rate=rate,
                                              overhead=op_overhead(device))
    report = _dataset(config, resolution)
    steps = _steps(config, report)
    images = report.num_images if report is not None else 0
    fill_s = images * trace.encode_flops_per_image / rate if config.cache_latents else 0.0
    assumptions.append(f"step time: the step's {trace.step_ops} operations ({trace.step_flops / 1e9:.1f} GFLOP), "
                       f"{timed_share:.0%} of their cost timed on this device, the rest scaled from those; "
                       f"{op_overhead(device) * 1e6:.0f} us per small operation; model loading, samples and the "
                       "effect check not included")
    return Estimate(device=device, memory_kind="CUDA memory" if device == "cuda" else "resident memory",
                    peak_bytes=int(peak), step_seconds=step_s, total_seconds=steps * step_s + fill_s, steps=steps,
                    resolution=resolution,
                    free_bytes=free_memory(device), parts=parts, assumptions=assumptions)


def alternatives(config: TrainConfig, device: str) -> list[tuple[str, TrainConfig]]:
    """Settings that use less memory, one change each, in the order a user would try them."""
    out = []
    if config.batch_size > 1:
        out.append((f"batch_size 1 (gradient_accumulation_steps {config.batch_size} keeps the effective batch)",
                    replace(config, batch_size=1,
                            gradient_accumulation_steps=config.gradient_accumulation_steps * config.batch_size)))
    if not config.gradient_checkpointing:
        out.append(("gradient_checkpointing on", replace(config, gradient_checkpointing=True)))
    if config.resolution and config.resolution > 256:
        lower = max(256, (int(config.resolution * 0.75) // 64) * 64)
        out.append((f"resolution {lower}", replace(config, resolution=lower)))
    if device == "cuda" and config.optimizer == "adamw":
        out.append(("optimizer adamw8bit (bitsandbytes)", replace(config, optimizer="adamw8bit")))
    if device == "cuda" and config.mixed_precision == "no":
        out.append(("mixed_precision bf16", replace(config, mixed_precision="bf16")))
    if not config.cache_latents:
        out.append(("cache_latents on", replace(config, cache_latents=True)))
    return out


def estimate_with_alternatives(config: TrainConfig, *, device: str | None = None,
                               baseline: int | None = None) -> tuple[Estimate, list[Estimate]]:
    """The estimate, and when it does not fit in free memory, one estimate per alternative setting."""
    first = estimate(config, device=device, baseline=baseline)
    if first.fits:
        return first, []
    others = []
    for change, alt in alternatives(replace(config, resolution=first.resolution), first.device):
        try:
            e = estimate(alt, device=first.device, baseline=first.parts.get("process"))
        except TrainerError:
            continue
        others.append(replace(e, change=change))
    return first, others


def advice(first: Estimate, others: list[Estimate]) -> str:
    """A few lines for the CLI and the UI: the estimate, and what would fit when it does not."""
    lines = [f"estimate: {first.summary()}"]
    if not first.fits:
        lines.append(f"this run may not fit: it needs ~{first.peak_bytes / GIB:.1f} GiB and "
                     f"{first.free_bytes / GIB:.1f} GiB is free. Settings that use less:")
        for e in others:
            mark = "fits" if e.fits else "still too much"
            lines.append(f"  {e.change}: ~{e.peak_bytes / GIB:.1f} GiB, ~{_duration(e.step_seconds)} per step "
                         f"({mark})")
    return "\n".join(lines)
