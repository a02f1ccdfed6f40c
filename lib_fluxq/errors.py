"""The exceptions fluxq raises for bad input: each names the file (and tensor) and says what to do."""

from __future__ import annotations

import os

_MAX_TENSOR_NAME = 160


class FluxqError(Exception):
    """Base class: a problem a user can act on, with a message meant for them."""


class FormatError(FluxqError):
    """A model file that cannot be read as what it claims to be.

    ``path`` and ``tensor`` (when known) are kept as attributes so callers (inspector, UI) can show them apart.
    """

    def __init__(self, path: str | os.PathLike[str] | None, reason: str, tensor: str | None = None,
                 fix: str | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        if tensor is not None and len(tensor) > _MAX_TENSOR_NAME:  # a damaged header can hold megabyte "names"
            tensor = tensor[:_MAX_TENSOR_NAME] + "…"
        self.tensor = tensor
        self.reason = reason
        self.fix = fix
        where = f"{self.path}" if self.path else "<buffer>"
        if tensor is not None:
            where += f", tensor '{tensor}'"
        message = f"{where}: {reason}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)

    def describe(self) -> str:
        """The message without the path: what is wrong (and where in the file), then what to do."""
        text = self.reason if self.tensor is None else f"tensor '{self.tensor}': {self.reason}"
        return f"{text} ({self.fix})" if self.fix else text


class UnsupportedTypeError(FluxqError):
    """A quantization type fluxq does not (yet) handle."""
