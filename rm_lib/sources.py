"""Read preference rows from a local file or folder, or a Hugging Face Hub dataset.

Local files are read by us, not by `datasets`, so that every problem names the file and row:
JSONL, JSON, Parquet and CSV, each gzipped or not.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
Rows = Iterator[tuple[int, dict]]  # (1-based row number, row)


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return next((s for s in SUFFIXES if name.endswith(s)), "")


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"corrupt or truncated gzip data ({exc}); download the file again",
                            file=str(path)) from None
    return data


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte {exc.start}); convert the file to UTF-8",
                        file=str(path), row=line) from None


def _cell(value: str) -> Any:
    """CSV cells are text; message lists arrive JSON-encoded, numbers as digits."""
    text = value.strip()
    if text.startswith("[") or text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return value


def read_file(path: str | Path) -> Rows:
    """Yield (row_number, row) for every row of one local file."""
    path = Path(path)
    suffix = _base_suffix(path)
    if not suffix:
        raise DataError(f"unsupported file type; expected one of {', '.join(SUFFIXES)} (optionally .gz)",
                        file=str(path))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(_read_bytes(path)))
        except Exception as exc:  # pyarrow raises many types for a damaged file
            raise DataError(f"not a readable Parquet file ({exc})", file=str(path)) from None
        yield from enumerate(table.to_pylist(), start=1)
        return
    text = _decode(path, _read_bytes(path))
    if not text.strip():
        raise DataError("the file is empty", file=str(path))
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON ({exc.msg} at column {exc.colno}); "
                                "the line may be half-written", file=str(path), row=number) from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON ({exc.msg})", file=str(path), row=exc.lineno) from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        if not isinstance(data, list):
            raise DataError("expected a JSON list of rows", file=str(path))
        yield from enumerate(data, start=1)
    else:
        reader = csv.DictReader(io.StringIO(text))
        for number, row in enumerate(reader, start=2):  # row 1 is the header
            yield number, {k: _cell(v) for k, v in row.items() if k is not None}


def local_files(path: str | Path) -> list[Path]:
    """A file, or every supported file of a folder (sorted, so the order is reproducible)."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _base_suffix(p) and not p.name.startswith("."))
    if not files:
        raise DataError(f"no {', '.join(SUFFIXES)} files found in the folder", file=str(path))
    return files


def split_of(path: Path, names: tuple[str, ...] = ("train", "test")) -> str | None:
    """A folder's own split, read from a file name such as train.jsonl or test-00000.parquet."""
    stem = path.name.lower()
    return next((n for n in names if stem.startswith(n) or f"/{n}" in str(path).lower()), None)


def read_hub(name: str, split: str, *, revision: str | None, subset: str | None) -> Rows:
    """The real `datasets.load_dataset` path that users with network use."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split, revision=revision)
    except FileNotFoundError as exc:
        raise DataError(f"Hub dataset not found or not reachable ({exc}); check the name and your network",
                        file=f"hf://{name}") from None
    except ConnectionError as exc:
        raise DataError(f"could not reach the Hugging Face Hub ({exc}); check your network or use a local file",
                        file=f"hf://{name}") from None
    except ValueError as exc:  # e.g. unknown split
        raise DataError(str(exc), file=f"hf://{name}") from None
    for number, row in enumerate(dataset, start=1):
        yield number, dict(row)


def hub_fingerprint(name: str, revision: str | None) -> str | None:
    """The commit sha the Hub serves for a dataset now (for the manifest and the change sensor)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, revision=revision).sha
    except Exception:  # offline or private: the manifest records the asked revision instead
        return None
