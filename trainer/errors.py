"""The one domain exception. Every message names the thing, its value and the fix."""
from __future__ import annotations


class TrainerError(Exception):
    """An error a user can act on; front ends show ``str(err)`` and no traceback.

    ``field`` names the config field or input at fault, when there is one.
    """

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(TrainerError):
    """One or more invalid config fields; ``errors`` maps field -> message."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        lines = [f"{field}: {msg}" for field, msg in self.errors.items()]
        first = next(iter(self.errors), None)
        if len(lines) == 1:
            text = f"Invalid setting {lines[0]}"
        else:
            text = "Invalid settings:\n  " + "\n  ".join(lines)
        super().__init__(text, field=first)
