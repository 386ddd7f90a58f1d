"""Checkpoints: atomic ``torch.save`` of the whole training state, loaded without executing code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from auxilia.atomic import write_with
from auxilia.errors import DataError

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``; keep the newest ``keep`` files."""
    path = checkpoint_path(folder, step)
    write_with(path, lambda handle: torch.save(state, handle))
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or unsafe files
        raise DataError(f"cannot load checkpoint {path}: {str(error).splitlines()[0]}") from error
    if not isinstance(state, dict) or "step" not in state:
        raise DataError(f"cannot load checkpoint {path}: not an auxilia checkpoint")
    return state
