"""User-facing errors: one clear message that names the problem and the fix, never a bare traceback."""
from __future__ import annotations


class KitError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.problem}\n  fix: {self.fix}" if self.fix else self.problem

    def _render_traceback_(self) -> list[str]:
        """IPython/papermill show this instead of a traceback, so a notebook stops with the message alone."""
        return [f"sccsdxl: {type(self).__name__}: {self.message}"]


class ParameterError(KitError):
    """A notebook or CLI parameter is unknown or out of range."""


class DataError(KitError):
    """A data file is missing, corrupt or does not match what the run expects."""


class ModelError(KitError):
    """Weights are missing or the model cannot be built on this machine."""


class DeviceError(KitError):
    """The requested device is not available."""


class OutputError(KitError):
    """The output location cannot be written."""
