import csv
import gzip
import json

import pytest

from rm_lib.errors import DataError
from rm_lib.sources import read_file

ROW = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.json.gz", "d.parquet", "d.csv", "d.csv.gz"])
def test_every_local_file_type(tmp_path, name):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / name
    base = name.removesuffix(".gz")
    if base.endswith(".jsonl"):
        data = (json.dumps(ROW) + "\n") * 2
    elif base.endswith(".json"):
        data = json.dumps([ROW, ROW])
    elif base.endswith(".csv"):
        data = "prompt,chosen,rejected\np,a,b\np,a,b\n"
    if base.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist([ROW, ROW]), path)
    else:
        raw = data.encode()
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    rows = list(read_file(path))
    assert [r for _, r in rows] == [ROW, ROW]


def test_csv_message_lists_are_decoded(tmp_path):
    path = tmp_path / "c.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["chosen", "rejected", "margin"])
        w.writerow([json.dumps([{"role": "user", "content": "q"}]), json.dumps([{"role": "user", "content": "r"}]), "0.5"])
    (_, row), = read_file(path)
    assert row["chosen"][0]["content"] == "q" and row["margin"] == 0.5


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(ROW) + "\n").encode() * 50)[:30])
    with pytest.raises(DataError, match=r"d.jsonl.gz: corrupt or truncated gzip"):
        list(read_file(path))


def test_half_written_line_names_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW)[:10])
    with pytest.raises(DataError, match=r"row 2: not valid JSON"):
        list(read_file(path))


def test_not_utf8_and_empty(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROW).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"row 2: not valid UTF-8"):
        list(read_file(path))
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        list(read_file(empty))
