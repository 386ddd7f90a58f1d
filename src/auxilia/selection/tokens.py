"""Byte-level tokens for language-model selection: no vocabulary file, nothing to download.

A text becomes its UTF-8 bytes (ids 0–255) between a begin (``BOS``) and an end (``EOS``) token,
cut to ``context`` tokens, then padded with ``PAD`` to ``context`` columns. A batch is ``ids``
[N, context] (int64) and ``lengths`` [N], the number of real tokens of each row (BOS and EOS
included); the attention mask is ``positions < lengths``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from auxilia.errors import DataError

BOS, EOS, PAD = 256, 257, 258
VOCAB = 259


def attention_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[N, width] bool: True at the real tokens of each row (the first ``lengths[i]``)."""
    positions = torch.arange(width, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens, ``context`` tokens per sample at most."""

    context: int = 128

    def __post_init__(self) -> None:
        if self.context < 2:
            raise DataError(f"context: needs at least 2 tokens (BOS and EOS), got {self.context}")

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids`` [N, context] int64 (``PAD`` after each row's real tokens) and ``lengths``."""
        ids = np.full((len(texts), self.context), PAD, dtype=np.int64)
        lengths = np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[: self.context - 1]
            row = np.concatenate(([BOS], data, [EOS]))[: self.context]
            ids[i, : len(row)] = row
            lengths[i] = len(row)
        return torch.from_numpy(ids), torch.from_numpy(lengths)

    def decode(self, ids: torch.Tensor) -> str:
        """The text of one row of ids (special tokens dropped; a cut character is replaced)."""
        data = bytes(int(t) for t in ids.tolist() if 0 <= int(t) < 256)
        return data.decode("utf-8", errors="replace")
