"""The service's preflight: a run's predicted peak memory and time from its form (trainer.loop.estimate), before
it starts, and the settings that would fit when it does not. The trace runs in this process on the meta device;
the trainer process's own memory (interpreter, torch and the model libraries, no UI) is measured once in a
fresh child process, since a run trains in one of those and not in the UI's process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

from trainer.errors import TrainerError

_BASELINE_CODE = ("import json, trainer.loop.train, trainer.loop.estimate as e; "
                  "print(json.dumps(e.process_rss()))")


class PreflightMixin:
    _baseline: int | None = None
    _baseline_lock = threading.Lock()

    def trainer_process_memory(self) -> int:
        """Resident memory of a trainer process before it loads a model (measured once, in a child process)."""
        with self._baseline_lock:
            if PreflightMixin._baseline is None:
                try:
                    out = subprocess.run([sys.executable, "-c", _BASELINE_CODE], capture_output=True, text=True,
                                         timeout=300, check=True).stdout
                    PreflightMixin._baseline = int(json.loads(out.strip().splitlines()[-1]))
                except (OSError, subprocess.SubprocessError, ValueError, IndexError) as err:
                    raise TrainerError(f"Could not measure a trainer process's memory ({type(err).__name__}); "
                                       "the estimate needs `python -c 'import trainer'` to work on this server.",
                                       field="model") from err
            return PreflightMixin._baseline

    def estimate_run(self, run: str, values: dict[str, Any]):
        """(estimate, alternatives) for training ``run`` with the form ``values`` (alternatives only when it
        does not fit in free memory). Raises ConfigError/TrainerError for settings that cannot train."""
        from trainer.loop.estimate import estimate_with_alternatives

        config = self.build_config(run, values)
        return estimate_with_alternatives(config, baseline=self.trainer_process_memory())
