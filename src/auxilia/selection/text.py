"""Text pools and the text target of language-model selection, streamed from files.

A text file holds one sample per row: ``.txt`` one per line (blank lines are skipped, so a
sample's index counts the non-blank lines), ``.jsonl`` one JSON object per line with a text
field, ``.csv`` and ``.parquet`` a text column (every row a sample; an empty string is an empty
sample). Files are read a chunk at a time and tokenized a batch at a time
(:class:`~auxilia.selection.tokens.ByteTokenizer`), so a pool never sits in memory; the
selected samples are written back as text (``<pool>.jsonl``, one ``{"text": ...}`` per line).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from auxilia.atomic import write_with
from auxilia.errors import DataError
from auxilia.selection.pools import Pool, PoolBatch
from auxilia.selection.tokens import VOCAB, ByteTokenizer

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet", ".pq")
_CHUNK = 1024  # rows read from a table at a time


def text_suffix(path: Path) -> str:
    """The file's suffix, if it is a text format selection reads (else a one-line error)."""
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise DataError(
            f"{path}: unsupported text file type '{suffix}'; use {', '.join(TEXT_SUFFIXES)}"
        )
    return suffix


def read_texts(path: Path, column: str = "text") -> Iterator[str]:
    """Every sample's text, in file order, streamed (``column``: the field of tables)."""
    suffix = text_suffix(path)
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    if suffix == ".txt":
        yield from _lines(path)
    elif suffix == ".jsonl":
        yield from _json_lines(path, column)
    elif suffix == ".csv":
        yield from _csv(path, column)
    else:
        yield from _parquet(path, column)


def _lines(path: Path) -> Iterator[str]:
    count = 0
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                text = line.rstrip("\r\n")
                if text.strip():
                    count += 1
                    yield text
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text after sample {count} ({err.reason})") from err


def _json_lines(path: Path, column: str) -> Iterator[str]:
    number = 0
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {number} is not JSON ({err.msg})") from err
                value = row.get(column) if isinstance(row, dict) else None
                if not isinstance(value, str):
                    raise DataError(f"{path}: line {number} has no text field '{column}'")
                yield value
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text after line {number} ({err.reason})") from err


def _csv(path: Path, column: str) -> Iterator[str]:
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]

    try:
        frames = pd.read_csv(
            path, usecols=[column], dtype=str, keep_default_na=False, chunksize=_CHUNK
        )
        for frame in frames:
            yield from (str(t) for t in frame[column])
    except ValueError as err:
        if "usecols" in str(err).lower():
            raise DataError(f"{path}: text column '{column}' not found") from err
        raise DataError(f"{path}: cannot be read as CSV ({_first_line(err)})") from err
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: cannot be read as CSV ({_first_line(err)})") from err


def _parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
        if column not in handle.schema_arrow.names:
            raise DataError(f"{path}: text column '{column}' not found")
        start = 0
        for batch in handle.iter_batches(batch_size=_CHUNK, columns=[column]):
            values = batch.column(0).to_pylist()
            for offset, value in enumerate(values):
                if not isinstance(value, str):
                    raise DataError(f"{path}: row {start + offset} of '{column}' is not text")
            start += len(values)
            yield from values
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot be read as Parquet ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass(frozen=True)
class TextPool(Pool):
    """A pool of text samples from ``path``: batches of byte tokens (``x`` ids, ``y`` lengths).

    ``head`` is always the target's (a language model has one output head); the tensor and
    column fields of :class:`Pool` (``data``, ``label_column``, ``feature_columns``) are unused.
    """

    text_column: str = "text"
    tokenizer: ByteTokenizer = field(default_factory=ByteTokenizer)

    def __post_init__(self) -> None:
        if self.path is None or self.data is not None:
            raise DataError(f"pool '{self.name}': a text pool reads a file (path), not tensors")
        if self.head != "target":
            raise DataError(f"pool '{self.name}': a language model has one head: use 'target'")
        if next(iter(read_texts(self.path, self.text_column)), None) is None:
            raise DataError(f"{self.path}: has no text samples")

    def texts(self) -> Iterator[str]:
        """The pool's texts in order."""
        assert self.path is not None
        return read_texts(self.path, self.text_column)

    def batches(self, size: int) -> Iterator[PoolBatch]:
        start, chunk = 0, []
        for text in self.texts():
            chunk.append(text)
            if len(chunk) == size:
                yield PoolBatch(start, *self.tokenizer.encode(chunk))
                start, chunk = start + size, []
        if chunk:
            yield PoolBatch(start, *self.tokenizer.encode(chunk))

    def size(self) -> int:
        assert self.path is not None
        if text_suffix(self.path) in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(self.path).metadata.num_rows)
        return sum(1 for _ in self.texts())

    def save(self, rows: torch.Tensor, directory: Path) -> Path:
        """Write the texts at the sorted pool ``rows`` to ``directory/<name>.jsonl``."""
        path = directory / f"{self.name}.jsonl"
        wanted = iter(torch.as_tensor(rows, dtype=torch.int64).tolist())

        def fill(handle: IO[bytes]) -> None:
            row = next(wanted, None)
            for index, text in enumerate(self.texts()):
                if row is None:
                    break
                if index == row:
                    line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                    handle.write(line.encode("utf-8"))
                    row = next(wanted, None)

        write_with(path, fill)
        return path


@dataclass(frozen=True)
class TextTarget:
    """The target of language-model selection: its samples as byte tokens, in memory."""

    name: str
    train: tuple[torch.Tensor, torch.Tensor]  # ids [N, context], lengths [N]
    kind: str = "text"
    outputs: int = VOCAB


def load_text_target(
    name: str, path: Path, column: str = "text", tokenizer: ByteTokenizer | None = None
) -> TextTarget:
    """The target's texts from ``path``, tokenized."""
    tokenizer = tokenizer or ByteTokenizer()
    texts = list(read_texts(path, column))
    if not texts:
        raise DataError(f"{path}: has no text samples")
    return TextTarget(name, tokenizer.encode(texts))
