"""Read preference rows from a local file or folder, or a Hugging Face Hub dataset.

Local files are read by us, not by `datasets`, so that every problem names the file and row:
JSONL, JSON, Parquet and CSV, each gzipped or not.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import json
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from rm_lib.data import formats
from rm_lib.errors import DataError
from rm_lib.files import special_file, where_kept

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
Rows = Iterator[tuple[int, dict]]  # (1-based row number, row)


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return next((s for s in SUFFIXES if name.endswith(s)), "")


_GZIP_ERRORS = (OSError, EOFError, zlib.error)
# Columns that hold numbers or token-id lists in a CSV file; every other cell stays text, and
# message columns become lists only when the file's first row holds a JSON message list there, or
# chosen and rejected lists of answers (RewardBench 2's best-of-N layout) in both.
CSV_NUMBER_COLUMNS = frozenset({"margin", "score_chosen", "score_rejected"})
CSV_LIST_COLUMNS = frozenset({*(c for pair in formats.ID_COLUMNS for c in pair), "attention_mask_chosen",
                              "attention_mask_rejected"})
CSV_MESSAGE_COLUMNS = frozenset({"prompt", "chosen", "rejected"})
CSV_ANSWER_COLUMNS = frozenset({"chosen", "rejected"})
_PARQUET_BATCH = 1024


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _gzip_error(path: Path, exc: BaseException) -> DataError:
    return DataError(f"corrupt or truncated gzip data ({exc}); download the file again", file=str(path))


@contextlib.contextmanager
def _open_binary(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes as a stream, decompressed on the fly when it is gzipped."""
    with (gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")) as handle:
        yield handle


MAX_LINE_BYTES = 256 << 20  # a row's line: past it, a damaged file or a gzip bomb (3 MB that expand to 3 GB)


def _lines(path: Path, row_of: Callable[[int], int] = lambda line: line,
           one_document: bool = False) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every line, streamed. Lines end at a newline byte only, so a raw
    U+2028, U+2029 or U+0085 inside a JSON string stays part of its row. `row_of` turns a line number
    into the row an error names (a CSV record may span lines). A line past MAX_LINE_BYTES is refused once
    that much is read (Linux kills a process that outgrows memory before Python can say MemoryError), but
    in `one_document` (JSON: a whole array may be one line)."""
    limit = None if one_document else MAX_LINE_BYTES
    with _open_binary(path) as handle:
        number = 0
        while True:
            try:
                raw = handle.readline(-1 if limit is None else limit + 2)
                # its one ending is no part of the row
                if limit is not None and len(raw.removesuffix(b"\n").removesuffix(b"\r")) > limit:
                    raise DataError(f"this line is longer than {limit >> 20} MiB, which no pair's row is (a damaged "
                                    "file, or a gzip that expands hugely); split it into rows, one per line",
                                    file=str(path), row=row_of(number + 1))
            except _GZIP_ERRORS as exc:
                raise _gzip_error(path, exc) from None
            except MemoryError:  # one line larger than memory: a damaged file, or a gzip that expands hugely
                raise DataError("this line is too large to read into memory; split the file into rows, one "
                                "per line", file=str(path), row=row_of(number + 1)) from None
            if not raw:
                return
            number += 1
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                row = row_of(number)
                where = "the line" if row == number else f"line {number}"
                raise DataError(f"not valid UTF-8 (byte {exc.start} of {where}); convert the file to UTF-8",
                                file=str(path), row=row) from None


def _read_text(path: Path) -> str:
    """A whole file as text, for formats that are one document (JSON: a whole array may be one line)."""
    return "".join(line for _, line in _lines(path, one_document=True))


_TOO_DEEP = "holds JSON nested deeper than Python reads (lists or objects inside each other thousands of times)"


def _too_long_number() -> str:
    return f"holds an integer of more than {sys.get_int_max_str_digits()} digits, which is no usable number"


def _jsonl_rows(path: Path) -> Rows:
    blank = True
    for number, line in _lines(path):
        if not line.strip():
            continue
        blank = False
        try:
            yield number, json.loads(line, object_pairs_hook=formats.unique_keys)
        except formats.RepeatedKey as exc:
            raise DataError(formats.repeated_key(exc.key), file=str(path), row=number) from None
        except json.JSONDecodeError as exc:
            # json's own messages may end in "at" ("Unterminated string starting at")
            raise DataError(f"not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno}); "
                            "the line may be half-written", file=str(path), row=number) from None
        except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
            raise DataError(_too_long_number(), file=str(path), row=number) from None
        except RecursionError:
            raise DataError(_TOO_DEEP, file=str(path), row=number) from None
    if blank:
        raise DataError("the file is empty", file=str(path))


def _json_rows(path: Path) -> Rows:
    text = _read_text(path)
    if not text.strip():
        raise DataError("the file is empty", file=str(path))
    try:
        data = json.loads(text, object_pairs_hook=formats.unique_keys)
    except formats.RepeatedKey as exc:
        raise DataError(formats.repeated_key(exc.key), file=str(path)) from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and _one_object_per_line(text):  # what Dataset.to_json writes, named .json
            yield from _jsonl_rows(path)
            return
        raise DataError(f"not valid JSON ({exc.msg})", file=str(path), row=exc.lineno) from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise DataError(_too_long_number(), file=str(path)) from None
    except RecursionError:
        raise DataError(_TOO_DEEP, file=str(path)) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise DataError("expected a JSON list of rows", file=str(path))
    yield from enumerate(data, start=1)


def _one_object_per_line(text: str) -> bool:
    first = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def _json_or_text(value: str) -> Any:
    """A cell of JSON (a message list) as its value, else the text; a key the reader reads written twice in
    it is formats.RepeatedKey, which the row's reader names."""
    try:
        return json.loads(value, object_pairs_hook=formats.unique_keys)
    except (json.JSONDecodeError, RecursionError):
        return value  # the normaliser names the row and field of a cell of the wrong type


def _number_or_text(value: str) -> Any:
    if not value.strip():
        return None  # CSV has no null: an empty score cell is a missing score
    try:
        return float(value)
    except ValueError:
        return value


def _is_message_list(value: str) -> bool:
    decoded = _json_or_text(value.strip()) if value.lstrip().startswith("[") else None
    return isinstance(decoded, list) and bool(decoded) and all(isinstance(m, dict) for m in decoded)


def _csv_rows(path: Path) -> Rows:
    # The csv module refuses a cell past 131,072 characters by default; a long conversation is no error, as
    # it is none in JSON Lines. A quoted cell spans lines, so a row's limit is the cell's too (a 326 KB gzip
    # of one cell over 160 Mi lines was read whole)
    csv.field_size_limit(MAX_LINE_BYTES)
    number = 1  # the record being read, the header being 1: a quoted cell may span several lines
    # strict: a quote opened and never closed is an error, not a cell that swallows the rows after it
    reader = csv.DictReader((line for _, line in _lines(path, row_of=lambda _line: number)), strict=True)
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise _csv_error(exc, path, number) from None
    if header is None:
        raise DataError("the file is empty", file=str(path))
    _check_columns(header, path, row=1)
    messages: set[str] | None = None  # message columns, decided by the first row
    answers: set[str] = set()  # columns of lists of answers, decided by the first row
    while True:
        number += 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _csv_error(exc, path, number) from None
        if None in row:  # DictReader files cells past the header's under None: a comma left unquoted
            raise DataError(f"{len(header) + len(row[None])} cells where the header has {len(header)}; quote a cell "
                            "that holds a comma (\"like, this\")", file=str(path), row=number)
        try:
            if messages is None:
                messages = {k for k in CSV_MESSAGE_COLUMNS & set(row) if _is_message_list(row[k] or "")}
                # both sides, as formats refuses them: a pairwise file's answer may be a JSON list of words
                if all(formats.answers_as_text(row.get(k) or "", unique=True) is not None for k in CSV_ANSWER_COLUMNS):
                    answers = set(CSV_ANSWER_COLUMNS)
            cells = {k: _csv_cell(k, v, messages, answers) for k, v in row.items()}
        except formats.RepeatedKey as exc:  # in a cell of JSON: a message's content written twice
            raise DataError(formats.repeated_key(exc.key), file=str(path), row=number) from None
        yield number, cells


def _csv_error(exc: csv.Error, path: Path, number: int) -> DataError:
    if "field larger than field limit" in str(exc):
        return DataError(f"a cell is longer than {MAX_LINE_BYTES >> 20} MiB, which no pair's is (a damaged file, or "
                         "a gzip that expands hugely); split it into rows", file=str(path), row=number)
    if "unexpected end of data" in str(exc):
        return DataError("a quoted cell is never closed: its opening '\"' has no closing one before the end of the "
                         "file; close the quote, or double a quote inside a quoted cell (\"say \"\"hi\"\"\")",
                         file=str(path), row=number)
    return DataError(f"not valid CSV ({exc}); a cell that holds a '\"' must be quoted whole, its own quotes doubled "
                     "(\"say \"\"hi\"\"\")", file=str(path), row=number)


def _csv_cell(column: str, value: str | None, messages: set[str], answers: set[str]) -> Any:
    if value is None:  # a short row
        return None
    if column in CSV_NUMBER_COLUMNS:
        return _number_or_text(value)
    if column in CSV_LIST_COLUMNS or column in messages:
        return _json_or_text(value)
    if column in answers:  # a cell that is no such list stays text: the reader names its row and field
        listed = formats.answers_as_text(value, unique=True)
        return value if listed is None else listed
    return value


def _parquet_rows(path: Path) -> Rows:
    import pyarrow.parquet as pq

    with _open_binary(path) as handle:
        try:
            parquet = pq.ParquetFile(handle)
            _check_columns(parquet.schema_arrow.names, path)
            batches = parquet.iter_batches(batch_size=_PARQUET_BATCH)
            number = 0
            for batch in batches:
                for row in batch.to_pylist():
                    number += 1
                    yield number, row
        except DataError:
            raise
        except Exception as exc:  # pyarrow (and a damaged gzip stream) raise many types
            raise DataError(f"not a readable Parquet file ({exc})", file=str(path)) from None


def _check_columns(names: Sequence[str], path: Path, row: int | None = None) -> None:
    """A column some format reads named twice: each row would keep the last one's value (the csv module and
    pyarrow's rows both do), and a header `prompt,chosen,rejected,chosen` trained on the fourth column
    without a word. Others (a spreadsheet's unnamed trailing columns) are ignored, as any other column."""
    repeated = sorted({name for name in names if name in formats.ROW_KEYS and names.count(name) > 1})
    if repeated:
        raise DataError(f"the column {repeated[0]!r} is named {names.count(repeated[0])} times, and the reader "
                        "cannot know which one is meant; rename or remove the others", file=str(path), row=row)


_READERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


def read_file(path: str | Path) -> Rows:
    """Yield (row_number, row) for every row of one local file, streamed: a bad row is reported
    as soon as it is read, and a consumer that stops early stops the reading."""
    path = Path(path)
    suffix = _base_suffix(path)
    if not suffix:
        raise DataError(f"unsupported file type; expected one of {', '.join(SUFFIXES)} (optionally .gz)",
                        file=str(path))
    yield from _READERS[suffix](path)


def local_files(path: str | Path) -> list[Path]:
    """A file, or every supported file of a folder (sorted, so the order is reproducible)."""
    path = Path(path)
    if path.is_file():
        _check_name(path)
        return [path]
    if path.exists() and not path.is_dir():
        raise DataError(f"is {special_file(path) or 'not a regular file'}: download and score read a source "
                        "more than once (to count, hash and read it); write the data to a file", file=str(path))
    if (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and any(path.glob("*.arrow"))):
        raise DataError("a folder that datasets' save_to_disk wrote (Arrow files), which download does not read; "
                        "write each split as a file instead: dataset.to_parquet('train.parquet'), and "
                        "'test.parquet' for a test split", file=str(path))
    files = sorted(p for p in _folder_files(path) if _base_suffix(p))
    if not files:
        skipped = unsupported_files(path)
        raise DataError(f"no {', '.join(SUFFIXES)} files found in the folder"
                        + (f" (of another type: {list_some(skipped)})" if skipped else ""), file=str(path))
    return files


def _check_name(file: Path) -> None:
    """A file name that is not UTF-8 cannot be written into the rows and manifests that name their file."""
    try:
        str(file).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(file).decode("utf-8", "backslashreplace")
        raise DataError("the file name is not valid UTF-8, and the pairs and records name their file: rename it",
                        file=shown) from None


def _folder_files(folder: Path) -> list[Path]:
    """Every file under `folder` but hidden ones (and those of hidden folders: .git, .ipynb_checkpoints),
    through links to files and folders. What cannot be read is an error naming it, never left out in
    silence: a subfolder without permission, a link to nothing (a DVC or git-annex file not fetched), a
    pipe or device; a link back to a folder above is read once."""
    found: list[Path] = []
    seen: set[str] = set()

    def unreadable(exc: OSError) -> None:
        raise DataError(f"cannot read the folder {exc.filename} ({exc.strerror}): its files would be left out; make "
                        "it readable, or move it out of the source folder", file=str(folder))

    inside = os.path.realpath(folder)
    for top, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link to a folder already read
            dirs.clear()
            continue
        seen.add(real)
        # a link to a folder of the source itself is read under the folder's own name (a split's: test/)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (
            os.path.islink(os.path.join(top, d))
            and Path(os.path.realpath(os.path.join(top, d))).is_relative_to(inside)))
        for name in names:
            if name.startswith("."):
                continue
            file = Path(top) / name
            if not _base_suffix(file):  # listed as not read (unsupported_files), whatever it is
                if file.is_file() or file.is_symlink():
                    found.append(file)
                continue
            _check_name(file)
            if file.is_symlink() and not file.exists():
                raise DataError(f"is a link to {os.readlink(file)}, which does not exist (a DVC or git-annex file not "
                                "fetched yet?): fetch it, or remove the link", file=str(file))
            if not file.is_file():
                raise DataError(f"is {special_file(file) or 'not a regular file'}, which a source folder cannot hold: "
                                "move it away", file=str(file))
            found.append(file)
    return found


def unsupported_files(path: str | Path) -> list[str]:
    """The files of a source folder that local_files leaves out for their type, relative to it: the user
    learns that `more.tsv` was not read. Hidden files and folders (.git, .DS_Store) are not named."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(os.fsencode(p.relative_to(path)).decode("utf-8", "backslashreplace")  # a name that is not UTF-8
                  for p in _folder_files(path) if not _base_suffix(p))


def list_some(names: list[str], most: int = 5) -> str:
    """The first `most` names, and how many more: a folder may hold thousands."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


# train, train-00003, train-00000-of-00002, train_prefs-00000-of-00001, and the Hub's older
# train-00000-of-00001-<16 hex digits>
_SHARD = re.compile(r"([a-z][a-z0-9_]*)(?:-\d+(?:-of-\d+)?(?:-[0-9a-f]{16})?)?")
_SPLIT_WORDS = frozenset({"train", "test", "valid", "validation", "dev", "eval", "evaluation"})


def _shard_name(name: str) -> str | None:
    name = name.lower().removesuffix(".gz")
    shard = _SHARD.fullmatch(name.removesuffix(_base_suffix(Path(name))))
    return shard.group(1) if shard else None


def split_of(path: Path, root: Path | None = None, names: tuple[str, ...] = ("train", "test")) -> str | None:
    """The split of `names` a file of a source folder holds, from exact names only (see README, Formats):
    `<split>.<ext>`, `<split>-00000-of-00001.<ext>`, `<split>-00000.<ext>` (each optionally .gz),
    or any file inside a sub-folder named `<split>`. `tests_data/` or `testimonials.jsonl` is no split."""
    path = Path(path)
    parts = path.relative_to(root).parts if root is not None and path.is_relative_to(root) else (path.name,)
    names = tuple(n.lower() for n in names)
    shard = _shard_name(parts[-1])
    if shard in names:
        return shard
    folders = [p.lower() for p in parts[:-1]]
    return next((n for n in names if n in folders), None)


def split_like(path: Path) -> str | None:
    """The split a file's name gives where it is not one of those asked for (`test_prefs`, `validation`):
    read as data of no split, it deserves a word."""
    shard = _shard_name(Path(path).name)
    words = set(shard.split("_")) if shard else set()  # whole words: not latest, contest, devices
    return shard if words & _SPLIT_WORDS else None


def read_hub(name: str, split: str, *, revision: str | None, subset: str | None) -> Rows:
    """The real `datasets.load_dataset` path that users with network use. Each request is time-limited
    (rm_lib.network); a Hub that cannot be reached is a transient DataError, a wrong name or split not."""
    import datasets

    from rm_lib import network

    network.bound_hub_client()
    where = f"hf://{name}"
    try:
        dataset = datasets.load_dataset(name, subset, split=split, revision=revision)
    except Exception as exc:  # datasets wraps the HTTP error; network.is_transient reads the chain
        if network.is_offline_refusal(exc) or (network.hub_offline() and isinstance(exc, FileNotFoundError)):
            raise DataError(f"not in the local datasets cache, and {network.OFFLINE_ADVICE}; or use a local file",
                            file=where) from None
        if network.is_transient(exc):
            raise DataError(f"could not reach the Hugging Face Hub ({network.first_line(exc)}); retryable: check your "
                            "network, or use a local file", file=where, transient=True) from None
        if isinstance(exc, FileNotFoundError):
            raise DataError(f"Hub dataset not found ({network.first_line(exc)}); check the name, and HF_TOKEN for a "
                            "private or gated dataset", file=where) from None
        if isinstance(exc, ValueError):  # e.g. unknown split or subset
            raise DataError(network.first_line(exc), file=where) from None
        raise
    for number, row in enumerate(dataset, start=1):
        yield number, dict(row)


def hub_fingerprint(name: str, revision: str | None) -> str | None:
    """The commit sha the Hub serves for a dataset now (for the manifest and the change sensor)."""
    try:
        from huggingface_hub import HfApi

        from rm_lib import network

        network.bound_hub_client()  # a stalled Hub costs the time limit, not the run
        return HfApi().dataset_info(name, revision=revision).sha
    except Exception:  # offline or private: the manifest records the asked revision instead
        return None


def source_kind(source: str) -> str:
    """demo | local | hub; a path-looking source that does not exist is a DataError."""
    if source == "demo":
        return "demo"
    if Path(source).exists():
        return "local"
    if source.startswith((".", "/", "~")) or Path(source).suffix in (".jsonl", ".json", ".csv", ".parquet", ".gz"):
        raise DataError("no such file or folder", file=source)
    return "hub"


def local_fingerprint(source: str | Path, previous: dict | None = None) -> dict:
    """{"sha256": content hash of the files download reads, "stats": their sizes and times}. The bytes
    decide: a touch or a rewrite with the same content keeps the hash. Files whose stats match
    `previous` are not read again."""
    from rm_lib.files import file_sha256

    files = local_files(source)
    stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    if previous and previous.get("stats") == stats and previous.get("sha256"):
        return previous
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return {"sha256": digest.hexdigest(), "stats": stats}


def untracked_note(path: str | Path, sources: Path) -> str | None:
    """A line for a local data file outside the project's data/sources folder, which dvc.yaml declares
    as a dependency: a change to a file elsewhere is invisible to `dvc status` and `dvc repro`."""
    # a file DVC linked into its cache is kept where its link is; a linked data/sources folder is where it leads
    places = {where_kept(path), Path(path).resolve()}
    if any(place.is_relative_to(base) for place in places for base in {where_kept(sources), sources.resolve()}):
        return None
    return (f"note: {path} lies outside {sources}, so `dvc repro` cannot see a change to it; keep your "
            "data files in data/sources (docs/dvc.md)")
