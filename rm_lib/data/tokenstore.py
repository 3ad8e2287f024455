"""Token rows on disk as Parquet (list<int32> columns): compact, columnar, byte-reproducible."""
from __future__ import annotations

from pathlib import Path

from rm_lib.errors import DataError
from rm_lib.files import atomic_file

COLUMNS = ("id", "input_ids_chosen", "attention_mask_chosen", "input_ids_rejected", "attention_mask_rejected",
           "prompt_length", "margin", "subset", "length_chosen", "length_rejected", "prompt_digest")


def _schema():
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.schema([("id", pa.string()), ("input_ids_chosen", ids), ("attention_mask_chosen", pa.list_(pa.int8())),
                      ("input_ids_rejected", ids), ("attention_mask_rejected", pa.list_(pa.int8())),
                      ("prompt_length", pa.int32()), ("margin", pa.float64()), ("subset", pa.string()),
                      ("length_chosen", pa.int32()), ("length_rejected", pa.int32()), ("prompt_digest", pa.string())])


def write_rows(path: str | Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{k: row.get(k) for k in COLUMNS} for row in rows], schema=_schema())
    with atomic_file(path, "wb") as handle:
        pq.write_table(table, handle, compression="zstd")


def read_rows(path: str | Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except FileNotFoundError:
        raise DataError("no such file; run the step that writes it first", file=str(path)) from None
    except (pa.ArrowException, OSError) as exc:  # cut short, or not Parquet at all
        raise DataError(f"not a readable Parquet file ({str(exc).splitlines()[0]}); run the step that writes it "
                        "again", file=str(path)) from None


def token_length(row: dict, side: str) -> int:
    """The tokens of one side before the length filter cut any (`length_<side>`, which the filter
    writes), else as stored: the length figures of an evaluation are about the texts, not the cut ids."""
    return row.get(f"length_{side}") or len(row[f"input_ids_{side}"])
