"""Test environment: offline, no telemetry, small thread count, tiny models built from configs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import gc  # noqa: E402

import diffusers  # noqa: E402,F401
import peft  # noqa: E402,F401
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402,F401

# The heavy imports leave ~1M long-lived objects; keeping them out of the GC's generations makes
# module-tree walks (PEFT injection) several times faster.
gc.freeze()

# Tiny models gain nothing from a second thread, and on a busy 2-core machine two threads per
# process oversubscribe the cores badly; TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("TEST_THREADS", "1")))


@pytest.fixture
def tiny_sd1():
    from tests.tiny_models import build_tiny
    return build_tiny("sd1")


@pytest.fixture
def tiny_sdxl():
    from tests.tiny_models import build_tiny
    return build_tiny("sdxl")


@pytest.fixture
def service(tmp_path):
    """A Service over tmp_path/outputs with its own presets folder (tests/test_service*.py); it may read
    datasets and models anywhere under tmp_path (app/sandbox.py)."""
    from app.service import Sandbox, Service

    outputs = tmp_path / "outputs"
    sandbox = Sandbox.build(outputs, data_roots=[tmp_path], model_roots=[tmp_path])
    return Service(outputs, presets_dir=tmp_path / "presets", sandbox=sandbox)
