"""The line under Start: the run's predicted peak memory and time, and, when it does not fit in free memory, a
warning with the settings that would (each with its estimate). Start refuses a run that does not fit once; a
second Start with the same settings trains anyway."""
from __future__ import annotations

import hashlib
import html
import json
from typing import Any

from app.service import Service, TrainerError

_STYLE = "font-size:0.9em;padding:4px 2px"


def _key(run: str, values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([run, values], sort_keys=True, default=str).encode()).hexdigest()


def estimate_html(first, others) -> str:
    """One line when it fits; a warning with the alternatives when it does not."""
    line = html.escape(first.summary())
    if first.fits:
        return f'<div id="estimate-line" style="{_STYLE};color:var(--body-text-color-subdued)">Estimate: {line}</div>'
    rows = "".join(f"<li>{html.escape(e.change)}: ~{e.peak_bytes / 2**30:.1f} GiB, "
                   f"{'fits' if e.fits else 'still too much'}</li>" for e in others)
    return (f'<div id="estimate-line" class="estimate-warn" style="{_STYLE};color:#b45309"><b>This run may not fit in '
            f"memory.</b> Estimate: {line}. Settings that use less:<ul style='margin:2px 0 2px 18px'>{rows}</ul>"
            "Press Start again to train anyway.</div>")


class Preflight:
    """Per-page memory of which settings were already warned about."""

    def __init__(self, service: Service):
        self.service = service
        self.warned: set[str] = set()

    def line(self, run: str, values: dict[str, Any]) -> str:
        try:
            return estimate_html(*self.service.estimate_run(run, values))
        except TrainerError as err:
            return f'<div id="estimate-line" style="{_STYLE}">No estimate: {html.escape(str(err))}</div>'

    def check(self, run: str, values: dict[str, Any]) -> tuple[bool, str]:
        """(start now?, the line to show). A run that does not fit is held back once per settings."""
        try:
            first, others = self.service.estimate_run(run, values)
        except TrainerError as err:          # the estimate never blocks a run: Start reports real errors itself
            return True, f'<div id="estimate-line" style="{_STYLE}">No estimate: {html.escape(str(err))}</div>'
        text = estimate_html(first, others)
        key = _key(run, values)
        if first.fits or key in self.warned:
            return True, text
        self.warned.add(key)
        return False, text
