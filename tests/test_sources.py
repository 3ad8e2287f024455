import contextlib
import csv
import gzip
import json

import pytest

from rm_lib.data.sources import read_file
from rm_lib.errors import DataError

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
        w.writerow([json.dumps([{"role": "user", "content": "q"}]), json.dumps([{"role": "user", "content": "r"}]),
                    "0.5"])
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
    with pytest.raises(DataError, match=r"row 2: not valid JSON \(Expecting value at column 11\); "
                                        "the line may be half-written"):
        list(read_file(path))
    path.write_text(json.dumps(ROW) + "\n" + '{"prompt": "half a')  # json's own message ends in "at"
    with pytest.raises(DataError, match=r"row 2: not valid JSON \(Unterminated string starting at column 12\); "):
        list(read_file(path))


def test_json_nested_too_deep_or_a_line_too_large_names_the_file_and_row(tmp_path, monkeypatch):
    """Lists inside lists 200,000 deep ended in a RecursionError traceback, and a gzip that expands to one
    line larger than memory in a bare MemoryError: neither named the file or the row."""
    from rm_lib.data import sources

    nested = '{"prompt": "a", "chosen": ' + "[" * 200_000 + "]" * 200_000 + ', "rejected": "b"}'
    lines = tmp_path / "d.jsonl"
    lines.write_text(json.dumps(ROW) + "\n" + nested + "\n")
    with pytest.raises(DataError, match=r"d.jsonl, row 2: holds JSON nested deeper than Python reads"):
        list(read_file(lines))
    whole = tmp_path / "d.json"
    whole.write_text("[" + json.dumps(ROW) + ", " + nested + "]")
    with pytest.raises(DataError, match=r"d.json: holds JSON nested deeper"):
        list(read_file(whole))

    class Huge:
        def __init__(self):
            self.lines = [json.dumps(ROW).encode() + b"\n"]

        def readline(self, size=-1):
            if self.lines:
                return self.lines.pop()
            raise MemoryError

    monkeypatch.setattr(sources, "_open_binary", lambda path: contextlib.nullcontext(Huge()))
    with pytest.raises(DataError, match=r"d.jsonl, row 2: this line is too large to read into memory"):
        list(read_file(lines))


def test_a_gzip_that_expands_to_one_huge_line_is_refused_once_the_limit_is_read(tmp_path, monkeypatch):
    """3 MB of gzip holding one 3 GiB line: download read it whole (12.7 GB resident) before it could say
    anything, and Linux kills a process that outgrows memory before Python raises MemoryError. A row's line
    past the limit is refused, naming the file and row; a .json document (an array on one line) is not."""
    from rm_lib.data import sources

    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 1 << 20)
    bomb = tmp_path / "bomb.jsonl.gz"
    with gzip.open(bomb, "wt") as out:
        out.write(json.dumps(ROW) + "\n" + json.dumps({**ROW, "prompt": "a" * (2 << 20)}) + "\n")
    with pytest.raises(DataError, match=r"bomb.jsonl.gz, row 2: this line is longer than 1 MiB"):
        list(read_file(bomb))
    whole = tmp_path / "one-line.json"
    whole.write_text(json.dumps([ROW] * 20_000))  # over 1 MiB, one line
    assert len(list(read_file(whole))) == 20_000
    # a quoted CSV cell spans lines: the cell's limit is the row's
    cells = tmp_path / "bomb.csv.gz"
    with gzip.open(cells, "wt") as out:
        out.write('prompt,chosen,rejected\np,"' + "a\n" * (1 << 20) + '",b\n')
    with pytest.raises(DataError, match=r"bomb.csv.gz, row 2: a cell is longer than 1 MiB"):
        list(read_file(cells))
    # exactly the limit is a row, whatever ends its line
    row = json.dumps({**ROW, "prompt": "a"})
    exact = json.dumps({**ROW, "prompt": "a" * ((1 << 20) - len(row) + 1)})
    assert len(exact) == 1 << 20
    for ending in ("\n", "\r\n", ""):
        (tmp_path / "exact.jsonl").write_text(exact + ending, newline="")
        assert len(list(read_file(tmp_path / "exact.jsonl"))) == 1
    # one ending is no part of the row, more are: the line is not cut into two rows at the limit
    (tmp_path / "split.jsonl").write_text(exact + "\r\r\r" + json.dumps(ROW) + "\n", newline="")
    with pytest.raises(DataError, match=r"split.jsonl, row 1: this line is longer than 1 MiB"):
        list(read_file(tmp_path / "split.jsonl"))


def test_not_utf8_and_empty(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROW).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"row 2: not valid UTF-8"):
        list(read_file(path))
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        list(read_file(empty))


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085"])
def test_a_raw_line_separator_inside_a_string_is_text_not_a_line_break(tmp_path, char):
    row = {"prompt": f"first{char}second", "chosen": "a", "rejected": "b"}
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(row, ensure_ascii=False) + "\n" + json.dumps(ROW) + "\n").encode())
    assert [r for _, r in read_file(path)] == [row, ROW]


def test_csv_text_stays_text_unless_the_column_is_declared(tmp_path):
    path = tmp_path / "c.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "note"])
        w.writerow(["How much is 5 + 5?", "10", "[1, 2, 3]", "2", "0.5", "7"])
        w.writerow(["And 1e3?", "1e3", '{"a": 1}', "", "", "x"])
    (_, first), (_, second) = read_file(path)
    assert first == {"prompt": "How much is 5 + 5?", "chosen": "10", "rejected": "[1, 2, 3]",
                     "score_chosen": 2.0, "score_rejected": 0.5, "note": "7"}
    assert second["chosen"] == "1e3" and second["rejected"] == '{"a": 1}' and second["score_chosen"] is None


def test_a_csv_cell_longer_than_the_csv_modules_default_limit_is_read(tmp_path):
    long = "word " * 60_000  # 300,000 characters; the csv module stops at 131,072 unless told otherwise
    path = tmp_path / "c.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "chosen", "rejected"], ["p", long, "b"], ["q", "a", "b"]])
    assert [r for _, r in read_file(path)] == [{"prompt": "p", "chosen": long, "rejected": "b"},
                                               {"prompt": "q", "chosen": "a", "rejected": "b"}]


def test_csv_quoted_cells_may_span_lines_and_a_broken_quote_names_its_record(tmp_path):
    head = 'prompt,chosen,rejected\n"a\nlong\nquestion","say ""hi""",b\nq2,a,b\n'
    path = tmp_path / "c.csv"
    path.write_text(head + "q3,a,b\n")
    assert [(n, r["prompt"]) for n, r in read_file(path)] == [(2, "a\nlong\nquestion"), (3, "q2"), (4, "q3")]
    assert next(read_file(path))[1]["chosen"] == 'say "hi"'
    path.write_text(head + 'q3,"a" and more,b\nq4,a,b\n')  # a quote closed mid-cell: the cell is unclear
    with pytest.raises(DataError, match=r"row 4: not valid CSV .*must be quoted whole"):
        list(read_file(path))
    path.write_text(head + 'q3,"a,b\nq4,a,b\n')
    with pytest.raises(DataError, match=r"row 4: a quoted cell is never closed"):
        list(read_file(path))


def test_a_non_utf8_byte_in_a_csv_names_its_record_like_other_csv_errors(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b'prompt,chosen,rejected\n"a\nlong\nquestion",a,b\nq2,a,b\nq3,caf\xe9,b\n')
    with pytest.raises(DataError, match=r"row 4: not valid UTF-8 \(byte 6 of line 6\)"):
        list(read_file(path))


def test_csv_token_id_columns_are_lists(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('input_ids_chosen,input_ids_rejected,margin\n"[1, 2]","[1, 3]",1\n')
    (_, row), = read_file(path)
    assert row == {"input_ids_chosen": [1, 2], "input_ids_rejected": [1, 3], "margin": 1.0}


def test_split_files_have_exact_names():
    from pathlib import Path

    from rm_lib.data.sources import split_of

    root = Path("/data/src")
    named = {"train.jsonl": "train", "test.jsonl.gz": "test", "data/test-00000-of-00001.parquet": "test",
             "train-00003.csv": "train", "train/0000.parquet": "train", "Test.JSON": "test",
             "testimonials.jsonl": None, "tests_data/a.jsonl": None, "training.jsonl": None,
             "contest.jsonl": None, "test_results/train_notes.csv": None}
    assert {name: split_of(root / name, root) for name in named} == named
    assert split_of(Path("/home/test/prefs.jsonl"), Path("/home/test")) is None  # only names under the source count
    from rm_lib.data.sources import split_like  # split names download does not take unasked, said in its summary

    assert [split_like(Path(n)) for n in ("test_prefs-00000-of-00001.parquet", "validation.jsonl", "latest.jsonl",
                                          "contest.jsonl", "devices.csv", "retrain.jsonl")] == [
        "test_prefs", "validation", None, None, None, None]


def test_parquet_is_read_by_batches_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(2500)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=300)
    out = list(read_file(path))
    assert [n for n, _ in out] == list(range(1, 2501)) and [r for _, r in out] == rows
    gz = tmp_path / "d.parquet.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [r for _, r in read_file(gz)] == rows


def _peak_rss_growth(fn):
    """Run fn() and return (its result or exception, the most RSS it added, seconds taken)."""
    import threading
    import time

    import psutil

    proc, peak, done = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss - base)
            time.sleep(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    start = time.perf_counter()
    try:
        outcome = fn()
    except Exception as exc:  # the caller checks which error it was
        outcome = exc
    elapsed = time.perf_counter() - start
    done.set()
    thread.join()
    return outcome, peak[0], elapsed


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    """About 200 MB of good rows."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    with open(path, "wb") as f:
        for block in range(200):
            f.write("".join(json.dumps({"prompt": f"{block}.{i} " + "p" * 1000, "chosen": "a" * 1000,
                                        "rejected": "b" * 1000}) + "\n" for i in range(330)).encode())
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_an_error_in_row_3_of_a_huge_file_is_found_without_reading_it_all(tmp_path, big_jsonl, gz):
    import shutil

    path = tmp_path / ("bad.jsonl.gz" if gz else "bad.jsonl")
    with open(big_jsonl, "rb") as src, (gzip.open(path, "wb", compresslevel=1) if gz else open(path, "wb")) as out:
        out.write(src.readline() * 2 + b'{"prompt": "half\n')
        shutil.copyfileobj(src, out, 1 << 24)
    outcome, grew, seconds = _peak_rss_growth(lambda: list(read_file(path)))
    assert isinstance(outcome, DataError) and "row 3: not valid JSON" in str(outcome)
    assert grew < 60e6 and seconds < 5, (grew, seconds)


def test_max_rows_stops_reading_a_huge_file_early(tmp_path, big_jsonl):
    from helpers import run_steps, tiny_params

    params = tiny_params(f"download.source={big_jsonl}", "download.max_rows=10")
    outcome, grew, seconds = _peak_rss_growth(lambda: run_steps(params, tmp_path, "download")["download"])
    assert not isinstance(outcome, Exception), outcome
    assert outcome.rows_read == 10 and grew < 60e6 and seconds < 5, (grew, seconds)
