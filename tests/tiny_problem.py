"""A tiny auxilia problem written into a folder, and helpers to call the ``auxilia`` command.

``write_tiny_problem(folder)`` writes the data files and a YAML config and returns the config's
path. The problem: 8 random float32 features; a 3-class target (30 train, 15 val, 15 test rows)
whose class is the argmax of the first three features; a ``helper`` dataset sharing the target's
head (same rule); an ``other`` dataset with its own 2-class head (sign of feature 3); and a
``parity`` task on the target's training inputs (sign of feature 4).

``poisoned_trunk`` is a trunk factory (``model.trunk: tests.tiny_problem:poisoned_trunk``) that
returns NaN features for the rows of one source after a given number of training forward passes.

``recurrent_trunk`` is an ``nn.LSTM`` trunk factory that ``ghost`` cannot measure.

``run_auxilia_process`` runs the real command in a subprocess; ``assert_one_line_error`` checks
the CLI's error contract (non-zero exit, one ``error:`` line on stderr, no traceback).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from auxilia.data.files import save_array_file

REPO_ROOT = Path(__file__).resolve().parents[1]
FEATURES = 8
CLASSES = 3
SPLITS = {"train": 30, "val": 15, "test": 15}
SOURCE_ROWS = 40
# Rows of the ``other`` source carry this value in feature 7, so a trunk can tell them apart.
MARKER = 50.0


def _features(rng: np.random.Generator, rows: int) -> np.ndarray:
    return rng.standard_normal((rows, FEATURES)).astype(np.float32)


def target_rule(x: np.ndarray) -> np.ndarray:
    """The learnable 3-class rule of the target (and of the ``helper`` source)."""
    return np.argmax(x[:, :CLASSES], axis=1).astype(np.int64)


def base_config() -> dict[str, Any]:
    """The config mapping of the tiny problem (data paths relative to the config's folder)."""
    return {
        "target": {
            "name": "tiny",
            "train": "data/target_train.npz",
            "val": "data/target_val.npz",
            "test": "data/target_test.npz",
            "num_classes": CLASSES,
            "batch_size": 8,
        },
        "sources": [
            {
                "name": "helper",
                "granularity": "dataset",
                "data": "data/helper.npz",
                "head": "target",
                "batch_size": 8,
            },
            {
                "name": "other",
                "granularity": "dataset",
                "data": "data/other.npz",
                "head": "own",
                "batch_size": 8,
            },
            {"name": "parity", "granularity": "task", "labels": "data/parity.npz"},
        ],
        "model": {"trunk": "mlp", "params": {"hidden": [16]}},
        "strategy": {"name": "gcs"},
        "sampler": {"name": "all"},
        "train": {
            "steps": 20,
            "lr": 0.01,
            "log_every": 5,
            "eval_every": 10,
            "checkpoint_every": 10,
            "seed": 0,
        },
    }


def write_data(folder: Path, seed: int = 0) -> None:
    """Write the tiny problem's ``.npz`` files under ``folder/data``."""
    rng = np.random.default_rng(seed)
    data = folder / "data"
    train_x = None
    for split, rows in SPLITS.items():
        x = _features(rng, rows)
        save_array_file(data / f"target_{split}.npz", x, target_rule(x))
        if split == "train":
            train_x = x
    assert train_x is not None
    x = _features(rng, SOURCE_ROWS)
    save_array_file(data / "helper.npz", x, target_rule(x))
    x = _features(rng, SOURCE_ROWS)
    y = (x[:, 3] > 0).astype(np.int64)
    x[:, 7] = MARKER
    save_array_file(data / "other.npz", x, y)
    save_array_file(data / "parity.npz", None, (train_x[:, 4] > 0).astype(np.int64))


def deep_update(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in (nested mappings merge; other values replace)."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_update(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def write_config(folder: Path, config: Mapping[str, Any], name: str = "config.yaml") -> Path:
    """Dump ``config`` as YAML into ``folder/name``; return the path."""
    path = folder / name
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    return path


def write_tiny_problem(
    folder: Path,
    changes: Mapping[str, Any] | None = None,
    *,
    name: str = "config.yaml",
    seed: int = 0,
) -> Path:
    """Write data and a config (the base config updated by ``changes``); return the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "data" / "target_train.npz").exists():
        write_data(folder, seed)
    return write_config(folder, deep_update(base_config(), changes or {}), name)


class _Poisoned(nn.Module):
    """An MLP whose features turn NaN for marked rows after ``after`` training forward passes."""

    def __init__(self, inner: nn.Module, after: int, marker: float) -> None:
        super().__init__()
        self.inner = inner
        self.after = after
        self.marker = marker
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        if not torch.is_grad_enabled():  # shape probing and evaluation
            return out
        self.calls += 1
        if self.calls > self.after:
            marked = (x.reshape(x.shape[0], -1)[:, -1] >= self.marker).unsqueeze(1)
            out = torch.where(marked, torch.full_like(out, float("nan")), out)
        return out


def poisoned_trunk(
    input_shape: Sequence[int],
    hidden: Sequence[int] = (16,),
    after: int = 12,
    marker: float = MARKER,
) -> nn.Module:
    """Trunk factory: marked rows (last feature >= ``marker``) give NaN from training step
    ``after + 1`` on (counting this process's training forward passes)."""
    from auxilia.models import mlp

    return _Poisoned(mlp(input_shape, hidden=hidden), after, marker)


class _Recurrent(nn.Module):
    """The features read as a sequence of scalars by an ``nn.LSTM``; its last state."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(1, width, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.reshape(x.shape[0], -1, 1))
        return out[:, -1]


def recurrent_trunk(input_shape: Sequence[int], hidden: Sequence[int] = (8,)) -> nn.Module:
    """Trunk factory: an ``nn.LSTM`` in float32, which ``ghost`` cannot replay per sample on
    CPU (the engine's ``auto`` mode then moves on to another mode)."""
    return _Recurrent(hidden[-1])


# ---- calling the command -----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """Exit code and captured streams of one ``auxilia`` invocation."""

    code: int
    stdout: str
    stderr: str


def run_auxilia_process(*args: str | Path, timeout: float = 120) -> Outcome:
    """Run ``python -m auxilia ARGS`` in a subprocess (repo root on PYTHONPATH for ``tests.*``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "200"
    done = subprocess.run(
        [sys.executable, "-m", "auxilia", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=timeout,
        check=False,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def torchrun(
    *args: str | Path, processes: int = 2, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone`` (a free port, so tests can run side by side) with ``args``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (REPO_ROOT, REPO_ROOT / "tests"))
    env["COLUMNS"] = "200"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        *map(str, args),
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(outcome: Outcome, *fragments: str) -> str:
    """Non-zero exit, no traceback, exactly one ``error:`` line on stderr naming ``fragments``."""
    assert outcome.code != 0, outcome
    assert "Traceback" not in outcome.stderr, outcome.stderr
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {outcome.stderr!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Deep, bitwise equality of checkpoint contents (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype, where
        assert a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple), where
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
