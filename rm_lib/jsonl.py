"""Reading the JSONL files this project writes."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import DataError


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DataError("not found; run the step that writes it first", file=str(path))
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise DataError("not found; run the step that writes it first", file=str(path))
    return json.loads(path.read_text(encoding="utf-8"))
