"""Token rows on disk as Parquet (list<int32> columns): compact, columnar, byte-reproducible."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

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


ROW_GROUP = 65_536  # rows per Parquet row group: written as they come, whatever the batches they came in
READ_BATCH = 4_096  # rows a step that reads a batch at a time holds as Python objects


def write_rows(path: str | Path, rows: list[dict]) -> None:
    write_batches(path, [rows])


def write_batches(path: str | Path, batches: Iterable[list[dict]]) -> int:
    """Rows written as their batches come: each batch becomes Arrow columns at once (4 bytes a token,
    not a Python object each: 200k tokenized pairs held as lists took 8 GB), written a row group at a
    time. The bytes depend on the rows alone, not on how they were batched. Returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, written = _schema(), 0
    waiting = schema.empty_table()
    with atomic_file(path, "wb") as handle, pq.ParquetWriter(handle, schema, compression="zstd") as writer:
        for batch in batches:
            table = pa.Table.from_pylist([{k: row.get(k) for k in COLUMNS} for row in batch], schema=schema)
            waiting = pa.concat_tables([waiting, table])
            while waiting.num_rows >= ROW_GROUP:
                writer.write_table(waiting.slice(0, ROW_GROUP).combine_chunks(), row_group_size=ROW_GROUP)
                written, waiting = written + ROW_GROUP, waiting.slice(ROW_GROUP)
        if waiting.num_rows or not written:  # an empty split is still a file of the schema
            writer.write_table(waiting.combine_chunks(), row_group_size=ROW_GROUP)
    return written + waiting.num_rows


IDS_ONLY = tuple(c for c in COLUMNS if not c.startswith("attention_mask_"))  # what scoring and training read


def read_rows(path: str | Path, columns: Sequence[str] | None = None) -> list[dict]:
    """Every row of `path` (of `columns` alone where given: train and evaluate hold no attention masks,
    which are all ones)."""
    return [row for batch in read_batches(path, columns=columns) for row in batch]


def read_batches(path: str | Path, size: int | None = None,
                 columns: Sequence[str] | None = None) -> Iterator[list[dict]]:
    """The rows of `path` in batches of `size`: a step that reads a batch at a time holds one batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        present = set(parquet.schema_arrow.names)
        for batch in parquet.iter_batches(batch_size=size or READ_BATCH,
                                          columns=None if columns is None else [c for c in columns if c in present]):
            yield _as_rows(batch)
    except FileNotFoundError:
        raise DataError("no such file; run the step that writes it first", file=str(path)) from None
    except (pa.ArrowException, OSError) as exc:  # cut short, or not Parquet at all
        raise DataError(f"not a readable Parquet file ({str(exc).splitlines()[0]}); run the step that writes it "
                        "again", file=str(path)) from None


_shared_ints: list = []  # _shared_ints[0][i] is i: one Python int object per token id value


def _ids(values) -> Any:
    """`values` (a numpy array of token ids) as an object array of shared int objects: a list of token ids
    then costs a pointer a token. Python made an int object of 28 bytes for every token id above 256 (with
    the pointer, 36 bytes a token: 4.3 GB held 100k pairs of 600 tokens a side in train)."""
    import numpy as np

    top = int(values.max()) + 1 if len(values) else 0
    table = _shared_ints[0] if _shared_ints else None  # this call's own reference: another thread may grow it
    if table is None or len(table) < top:
        table = np.arange(max(top, 2 * len(table) if table is not None else top), dtype=np.int64).astype(object)
        _shared_ints[:] = [table]
    return table[values]


def _as_rows(batch) -> list[dict]:
    """A record batch as rows, the token id lists made of shared int objects (the same values, the same
    types: every reader sees what to_pylist gives)."""
    import pyarrow as pa

    columns = []
    for field, column in zip(batch.schema, batch.columns):
        if (pa.types.is_list(field.type) and pa.types.is_integer(field.type.value_type) and not column.null_count
                and not column.values.null_count):
            values = column.values.to_numpy(zero_copy_only=False)
            if len(values) and values.min() < 0:  # not token ids
                columns.append(column.to_pylist())
                continue
            shared, offsets = _ids(values), column.offsets.to_numpy()
            columns.append([shared[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])])
        else:
            columns.append(column.to_pylist())
    names = batch.schema.names
    return [dict(zip(names, values)) for values in zip(*columns)] if columns else []


def token_length(row: dict, side: str) -> int:
    """The tokens of one side before the length filter cut any (`length_<side>`, which the filter
    writes), else as stored: the length figures of an evaluation are about the texts, not the cut ids."""
    return row.get(f"length_{side}") or len(row[f"input_ids_{side}"])
