"""Loading a node's own saved state (a stage's checkpoint, a validator's baselines and strikes, a trainer's
checkpoint) with a clear error when the file cannot be used.

Saves are atomic (a temporary file, then a rename), so a crash while saving leaves the previous state, never half a
file; what this guards against is a file damaged afterwards (a disk error, a copy cut short) or one that is not such
a state at all. The file is left where it is: the state in it (a stage's training, a validator's strikes) matters,
and deleting it is the operator's decision.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

_T = TypeVar("_T")


class StateFileError(ValueError):
    """A node's saved state cannot be read or does not fit this node (``sentinel-node`` prints it, exit status 2)."""


def save_state_file(state: Any, path: str | os.PathLike) -> None:
    """``torch.save(state)`` to ``path`` atomically and durably: into a temporary file of its own in the same folder,
    synced to disk, then renamed over ``path``. A crash at any moment leaves the previous file or the new one, never
    half of one (and the rename never lands before the data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            torch.save(state, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_state_file(path: str | os.PathLike, what: str, apply: Callable[[Any], _T], *, weights_only: bool,
                    map_location: Any = None) -> _T:  # fmt: skip
    """``apply(torch.load(path))``; any failure of either becomes a :class:`StateFileError` that names the file, what
    it holds (``what``) and the way out. ``FileNotFoundError`` and ``ValueError`` subclasses raised by ``apply`` on
    purpose (e.g. a checkpoint of another run) pass through unchanged: they already say what is wrong."""
    try:
        state = torch.load(os.fspath(path), map_location=map_location, weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise StateFileError(_message(path, what, "cannot be read", e)) from e
    try:
        return apply(state)
    except (FileNotFoundError, StateFileError):
        raise
    except ValueError as e:
        if type(e) is not ValueError:  # a typed, user-facing error of the caller's
            raise
        raise StateFileError(_message(path, what, "does not fit this node", e)) from e
    except Exception as e:
        raise StateFileError(_message(path, what, "is malformed", e)) from e


def _message(path: str | os.PathLike, what: str, problem: str, error: Exception) -> str:
    return (f"the {what} in {os.fspath(path)} {problem} ({type(error).__name__}: {str(error)[:200]}); it was left "
            "as it is: move it away to start this node afresh")  # fmt: skip
