"""Benchmark results kept on disk between runs: one JSON record per key and scenario.

A record lives at ``root/<folder>/<scenario>/<key>.json`` and is written atomically; a file that
is missing, unreadable or not a successful record (``"ok": true``) reads as absent, so a
failed or interrupted job is simply run again. Keys are hashes of everything that defines
the job (see :func:`auxilia.bench.ground_truth.cache_key`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from auxilia.atomic import write_json


class RecordCache:
    """Successful job records on disk: ``root/folder/<scenario>/<key>.json``."""

    def __init__(self, root: Path, folder: str) -> None:
        self.root = Path(root) / folder

    def path(self, scenario: str, key: str) -> Path:
        return self.root / scenario / f"{key}.json"

    def get(self, scenario: str, key: str) -> dict[str, Any] | None:
        path = self.path(scenario, key)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) and record.get("ok") else None

    def put(self, scenario: str, key: str, record: Mapping[str, Any]) -> None:
        write_json(self.path(scenario, key), dict(record))
