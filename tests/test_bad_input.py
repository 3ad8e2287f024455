"""Every kind of bad input a user brings, through the command line: one paragraph that names the file,
row and field, exit code 2, no traceback, nothing written that looks complete, and no row lost."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rm_lib.cli import main
from rm_lib.files import read_json, read_jsonl
from rm_lib.layout import Layout

GOOD = [{"prompt": f"question {i}: what is {i} plus {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."}
        for i in range(20)]


def lines(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def cli(root: Path, *args: str, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # only what this command prints
    code = main(["--root", str(root), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def download(root: Path, name: str, data: bytes, capsys) -> tuple[int, str, Path]:
    path = root / name
    path.write_bytes(data)
    code, _, err = cli(root, "--set", f"download.source={path}", "download", capsys=capsys)
    return code, err, path


def assert_user_error(code: int, err: str, *parts: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, "the error is one paragraph"
    for part in parts:
        assert part in err


BROKEN_FILES = {
    "corrupt gzip": ("d.jsonl.gz", b"\x1f\x8b\x08\x00" + os.urandom(64), ["corrupt or truncated gzip"]),
    "truncated gzip": ("d.jsonl.gz", gzip.compress(lines(GOOD))[:-25], ["corrupt or truncated gzip"]),
    "half-written line": ("d.jsonl", lines(GOOD) + json.dumps(GOOD[0]).encode()[:17], ["row 21", "half-written"]),
    "not UTF-8": ("d.jsonl", lines(GOOD) + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"),
                  ["row 21", "not valid UTF-8"]),
    "empty file": ("d.jsonl", b"", ["the file is empty"]),
    "wrong type": ("d.jsonl", lines(GOOD + [{"prompt": "p", "chosen": 5, "rejected": "b"}]),
                   ["row 21", "field 'chosen'", "got int"]),
    "wrong type later in a text file": ("d.jsonl", lines(GOOD + [{"prompt": 5, "chosen": "a", "rejected": "b"}]),
                                        ["row 21", "field 'prompt'", "got int"]),
    "unknown columns": ("d.jsonl", lines([{"question": "q", "good": "a", "bad": "b"}]),
                        ["row 1", "missing column(s) chosen, rejected", "found columns bad, good, question"]),
    "one prompt for every pair": ("d.jsonl", lines([dict(r, prompt="the same question") for r in GOOD]),
                                  ["all 20 pairs share one prompt", "download.test_split"]),
    # the error pointed at the rejects file (empty, or of the one row set aside) instead of the cause
    "one pair": ("d.jsonl", lines(GOOD[:1]), ["no usable pairs for test after reading 1 row (1 usable pair is too few "
                                              "to split by prompt at download.test_fraction=0.2: add rows to the "
                                              "source, or give the source a test split; none rejected)"]),
    "one pair and one set aside": (
        "d.jsonl", lines([GOOD[0], dict(GOOD[1], rejected=GOOD[1]["chosen"])]),
        ["after reading 2 rows (1 usable pair is too few to split", "; 1 rejected: {'identical': 1}; e.g. row 2"]),
    # valid JSON, but no UTF-8 text can hold it: the tokenizer would fail on it, far from its row
    "a lone surrogate": ("d.jsonl", lines(GOOD + [{"prompt": "p", "chosen": "a\ud800", "rejected": "b"}]),
                         ["row 21", "field 'chosen'", "lone surrogate (\\ud800 at character 1)"]),
    # a quote opened and never closed: the rows after it would become one cell of one wrong pair
    "a CSV quote never closed": (
        "d.csv", ("prompt,chosen,rejected\n"
                  + "".join(f"question {i}?,good answer {i},bad answer {i}\n" for i in range(4))
                  + 'question 4?,"good answer 4,bad answer 4\n'
                  + "".join(f"question {i}?,good answer {i},bad answer {i}\n" for i in range(5, 40))).encode(),
        ["row 6", "a quoted cell is never closed"]),
    # more digits than Python reads as an integer (4300 by default)
    "an integer of 5000 digits": ("d.jsonl", lines(GOOD) + b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": '
                                  + b"9" * 5000 + b"}\n", ["row 21", "holds an integer of more than"]),
    # a comma left unquoted: the row would be read as another pair, its last cell lost
    "a CSV cell with an unquoted comma": (
        "d.csv", ("prompt,chosen,rejected\n" + "".join(f'"q{i}","a{i}","b{i}"\n' for i in range(20))
                  + "q,good, really good answer,bad answer\n").encode(),
        ["row 22", "4 cells where the header has 3", "quote a cell that holds a comma"]),
    # a column or key named twice: each row kept the last one's value, and trained on it without a word
    "a CSV column named twice": (
        "d.csv", ("prompt,chosen,rejected,chosen\n" + "".join(f"q{i},good {i},bad {i},other {i}\n"
                                                             for i in range(20))).encode(),
        ["row 1", "the column 'chosen' is named 2 times"]),
    "an id column named twice": (
        "d.csv", ("id,prompt,chosen,rejected,id\n" + "".join(f"{i},q{i},good {i},bad {i},{i + 100}\n"
                                                            for i in range(20))).encode(),
        ["row 1", "the column 'id' is named 2 times"]),
    "a JSON Lines key written twice": (
        "d.jsonl", lines(GOOD) + b'{"prompt": "p", "chosen": "a", "rejected": "b", "chosen": "c"}\n',
        ["row 21", "the key 'chosen' is written twice in one object"]),
    "a message key written twice in a JSON file": (
        "d.json", json.dumps(GOOD).encode()[:-1] + b', {"prompt": "p", "chosen": [{"role": "assistant", '
        b'"content": "a", "content": "c"}], "rejected": "b"}]', ["the key 'content' is written twice"]),
    "a message key written twice in a CSV cell of JSON": (
        "d.csv", ('prompt,chosen,rejected\n' + "".join(f'q{i},"[{{""role"":""assistant"",""content"":""a{i}""}}]",'
                                                        f'"[{{""role"":""assistant"",""content"":""b{i}""}}]"\n'
                                                        for i in range(20))
                  + 'q,"[{""role"":""assistant"",""content"":""a"",""content"":""c""}]",b\n').encode(),
        ["row 22", "the key 'content' is written twice"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_a_broken_file_is_one_clear_error_and_nothing_complete_is_written(tmp_path, capsys, case):
    name, data, parts = BROKEN_FILES[case]
    code, err, path = download(tmp_path, name, data, capsys)
    assert_user_error(code, err, f"file {path}", *parts)
    assert not (Layout(tmp_path).pairs / "manifest.json").exists()


def test_every_row_rejected_is_an_error_that_keeps_every_reject(tmp_path, capsys):
    rows = [{"prompt": f"p{i}", "chosen": "same", "rejected": "same"} for i in range(5)]
    code, err, path = download(tmp_path, "d.jsonl", lines(rows), capsys)
    assert_user_error(code, err, f"file {path}", "5 rejected", "identical", "e.g. row 1:")
    pairs = Layout(tmp_path).pairs
    assert f"see {pairs.with_name('pairs.rejects.jsonl')}" in err
    assert [r["row"] for r in read_jsonl(pairs.with_name("pairs.rejects.jsonl"))] == [1, 2, 3, 4, 5]
    assert not pairs.exists()


def test_csv_answers_that_look_like_numbers_or_lists_stay_text(tmp_path, capsys):
    rows = "".join(f'"what is {i} + {i}?",{2 * i},"[{i}, {i}]"\n' for i in range(20))
    code, err, _ = download(tmp_path, "d.csv", f"prompt,chosen,rejected\n{rows}".encode(), capsys)
    assert code == 0, err
    pairs = read_jsonl(Layout(tmp_path).pairs / "train.jsonl") + read_jsonl(Layout(tmp_path).pairs / "test.jsonl")
    assert {p["chosen"][0]["content"] for p in pairs} == {str(2 * i) for i in range(20)}


def test_bad_roles_set_the_row_aside_with_its_reason_and_keep_the_rest(tmp_path, capsys):
    good = [{"chosen": [turn("user", f"q{i}"), turn("assistant", "yes")],
             "rejected": [turn("user", f"q{i}"), turn("assistant", "no")]} for i in range(10)]
    bad = {"chosen": [turn("user", "q"), turn("robot", "a")], "rejected": [turn("user", "q"), turn("assistant", "b")]}
    code, _, path = download(tmp_path, "d.jsonl", lines(good[:4] + [bad] + good[4:]), capsys)
    assert code == 0
    pairs = Layout(tmp_path).pairs
    (reject,) = read_jsonl(pairs / "rejects.jsonl")
    assert reject["row"] == 5 and reject["file"] == str(path) and "'robot'" in reject["detail"]
    manifest = read_json(pairs / "manifest.json")
    assert manifest["rows_read"] == 11 and manifest["rejected"] == 1
    assert sum(manifest["pairs"].values()) == 10

    code, err, _ = download(tmp_path, "all-bad.jsonl", lines([bad] * 3), capsys)
    assert_user_error(code, err, "3 rejected", "malformed_messages", "e.g. row 1: chosen[1] has unknown role 'robot'")
    # the example is of the commonest reason, not of the first row set aside
    conversation = [turn("user", "q"), turn("assistant", "a")]
    same = {"chosen": conversation, "rejected": conversation}
    code, err, _ = download(tmp_path, "mixed.jsonl", lines([same] + [bad] * 3), capsys)
    assert_user_error(code, err, "{'malformed_messages': 3, 'identical': 1}", "e.g. row 2: chosen[1] has unknown")


def test_unknown_extra_columns_are_ignored_and_reported(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(lines([dict(r, source="forum", annotator=7) for r in GOOD]))
    code, out, _ = cli(tmp_path, "--set", f"download.source={path}", "download", capsys=capsys)
    assert code == 0 and "ignored columns annotator, source" in out
    manifest = read_json(Layout(tmp_path).pairs / "manifest.json")
    assert manifest["ignored_columns"] == {"annotator": 20, "source": 20}


def test_message_keys_training_leaves_out_are_counted_and_named_where_they_made_a_pair_identical(tmp_path, capsys):
    """A message is trained on as its role and content: a reasoning trace beside the content was left
    out without a word, and a pair that differed only there was set aside as plainly identical."""
    def row(i, thought, other_thought, rejected_answer):
        return {"prompt": [{"role": "user", "content": f"question {i}"}],
                "chosen": [{"role": "assistant", "content": "a good answer", "reasoning_content": thought}],
                "rejected": [{"role": "assistant", "content": rejected_answer, "reasoning_content": other_thought}]}

    rows = [row(i, "careful", "sloppy", "a bad answer") for i in range(19)] + [row(19, "careful", "sloppy",
                                                                                    "a good answer")]
    rows[0]["chosen"][0]["reasoning_content"] = ""  # no value: nothing left out
    path = tmp_path / "d.jsonl"
    path.write_bytes(lines(rows))
    code, out, _ = cli(tmp_path, "--set", f"download.source={path}", "download", capsys=capsys)
    assert code == 0 and "ignored columns chosen[].reasoning_content, rejected[].reasoning_content" in out
    layout = Layout(tmp_path)
    manifest = read_json(layout.pairs / "manifest.json")
    assert manifest["ignored_columns"] == {"chosen[].reasoning_content": 19, "rejected[].reasoning_content": 20}
    reject, = [json.loads(line) for line in (layout.pairs / "rejects.jsonl").read_text().splitlines()]
    assert (reject["row"], reject["reason"]) == (20, "identical")
    assert reject["detail"] == ("chosen is identical to rejected once their messages are read as training reads "
                                "them, a role and a content each (reasoning_content left out)")
    # keys named only where the sides differ there; a prompt's keys are the prompt's, also where the prompt is
    # the turns both sides begin with (an implicit layout)
    from rm_lib.data import formats

    same = row(0, "careful", "careful", "a good answer")
    same["prompt"][0]["name"] = "bob"
    with pytest.raises(formats.Rejected) as caught:
        formats.normalise_row(same, "explicit_conversational", file="f", row_number=1)
    assert caught.value.detail == "chosen is identical to rejected"
    implicit = {"chosen": [{"role": "user", "content": "q", "name": "bob"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q", "name": "bob"}, {"role": "assistant", "content": "b",
                                                                             "reasoning_content": "hm"}]}
    assert formats.left_out_keys(implicit) == {"prompt[].name", "rejected[].reasoning_content"}


def test_a_million_character_row_is_set_aside_for_length_and_counted(tmp_path, capsys):
    huge = {"prompt": "a question", "chosen": "word " * 200_000, "rejected": "short"}
    code, _, _ = download(tmp_path, "d.jsonl", lines(GOOD + [huge]), capsys)
    assert code == 0
    code, _, err = cli(tmp_path, "--set", "filter.max_token_length=64", "--set", "filter.max_prompt_token_length=32",
                       "tokenize", capsys=capsys)
    assert code == 0, err
    code, out, err = cli(tmp_path, "--set", "filter.max_token_length=64", "--set", "filter.max_prompt_token_length=32",
                         "filter", capsys=capsys)
    assert code == 0, err
    filtered = Layout(tmp_path).filtered
    dropped = read_jsonl(filtered / "dropped.jsonl")
    assert [d["id"] for d in dropped] == [f"{tmp_path / 'd.jsonl'}:21"]
    manifest = read_json(filtered / "manifest.json")
    kept = sum(manifest["kept"].values())
    assert kept + len(dropped) == len(GOOD) + 1  # nothing lost: kept plus set aside is everything read


# --- settings that cannot work, caught before any work starts --------------------------------------

def test_a_model_without_a_sequence_classification_head_fails_before_any_work(tmp_path, capsys):
    from transformers import ViTConfig, ViTModel

    folder = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4)).save_pretrained(folder)
    code, _, err = cli(tmp_path, "--set", f"model.name_or_path={folder}", "run", capsys=capsys)
    assert_user_error(code, err, "model.name_or_path", "(vit) has no sequence-classification head")
    assert not (tmp_path / "data").exists()


def test_a_two_output_classifier_fails_before_any_work(tmp_path, capsys, minilm_path):
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path / "two"
    AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).save_pretrained(folder)
    code, _, err = cli(tmp_path, "--set", f"model.name_or_path={folder}", "run", capsys=capsys)
    assert_user_error(code, err, "2 outputs; a reward model needs exactly one score")
    assert not (tmp_path / "data").exists()


def test_an_attention_the_model_has_no_path_for_fails_before_any_work(tmp_path, capsys, tiny_decoder):
    """Gemma2 computes no attention through SDPA (its soft-capped logits): train.attention=sdpa was a
    40-line traceback once download, tokenize and filter had replaced their outputs."""
    import shutil

    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    folder = tmp_path / "gemma2"
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder)
    Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                      ).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_decoder / name).exists():
            shutil.copy(tiny_decoder / name, folder / name)
    code, _, err = cli(tmp_path, "--set", f"model.name_or_path={folder}", "--set", "train.attention=sdpa",
                       "--set", "download.demo_pairs=60", "--set", "filter.max_token_length=128", "--set",
                       "filter.max_prompt_token_length=64", "run", capsys=capsys)
    assert_user_error(code, err, "train.attention: Gemma2ForSequenceClassification cannot compute attention with sdpa",
                      "set train.attention=auto (the model's own) or eager")
    assert not (tmp_path / "data").exists()
    # DeBERTa-v2 cannot be switched at all: transformers only warned, and the run trained with eager attention
    # while its log and summary.json said sdpa
    from transformers import DebertaV2Config

    from rm_lib.errors import SettingsError
    from rm_lib.model.modeling import check_attention

    deberta = DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, num_labels=1)
    with pytest.raises(SettingsError, match=r"train.attention: DebertaV2ForSequenceClassification computes attention "
                                            r"its own way \(eager\) and cannot be switched to sdpa"):
        check_attention(deberta, "sdpa")
    check_attention(deberta, "eager")  # its own


# --- the Hub: names that do not exist, no network ------------------------------------------------

def test_offline_hub_dataset_and_model_are_clear_errors(tmp_path, capsys):
    code, _, err = cli(tmp_path, "--set", "download.source=no-such-org/no-such-data", "download", capsys=capsys)
    # offline (the tests', make's default): said so, not called a Hub that could not be reached
    assert_user_error(code, err, "hf://no-such-org/no-such-data", "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set")
    code, _, err = cli(tmp_path, "--set", "model.name_or_path=no-such-org/no-such-model", "tokenize", capsys=capsys)
    assert_user_error(code, err, "cannot load 'no-such-org/no-such-model'", "not in the local Hugging Face cache")


class NotFound(BaseHTTPRequestHandler):
    """A Hub that knows no repository: every request is a 404 as the Hub answers it."""

    def _answer(self) -> None:
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def empty_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("setting, step, expected", [
    ("download.source=no-such-org/no-such-data", "download", "hf://no-such-org/no-such-data"),
    ("model.name_or_path=no-such-org/no-such-model", "tokenize", "cannot load 'no-such-org/no-such-model'"),
])
def test_a_hub_name_that_does_not_exist_is_a_clear_error(tmp_path, empty_hub, setting, step, expected):
    """An HF_ENDPOINT behind a proxy may carry a password: no message says it."""
    endpoint = empty_hub.replace("http://", "http://alice:S3CRET-PW@")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": endpoint,
           "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(tmp_path), "--set", setting, step],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "S3CRET" not in done.stderr + done.stdout
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and expected in error[0]
    assert not (tmp_path / "data" / "pairs" / "manifest.json").exists()


def test_test_pairs_that_are_also_train_pairs_are_counted_and_warned_about(tmp_path, capsys):
    """A source's own splits are taken as they are; where they share pairs, the held-out accuracy
    would count pairs the model trained on."""
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(lines(GOOD))
    (folder / "test.jsonl").write_bytes(lines(GOOD[:5] + [dict(GOOD[5], chosen="something else")]))
    code, out, _ = cli(tmp_path, "--set", f"download.source={folder}", "download", capsys=capsys)
    assert code == 0
    assert "warning: 5 of the 6 test pairs are also train pairs" in out
    assert read_json(Layout(tmp_path).pairs / "manifest.json")["test_pairs_in_train"] == 5


def test_a_set_aside_row_whose_other_columns_json_cannot_hold_is_written_as_text(tmp_path, capsys):
    """A row is set aside for its answers; a datetime, bytes or a lone surrogate in a column no format
    reads must not stop the rejects (and with them the whole step) from being written."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r, created=datetime.datetime(2024, 1, 2, 3, 4), blob=b"\x00\xff") for r in GOOD]
    rows[2]["rejected"] = rows[2]["chosen"]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    code, _, err = cli(tmp_path, "--set", f"download.source={path}", "download", capsys=capsys)
    assert code == 0, err
    (reject,) = read_jsonl(Layout(tmp_path).pairs / "rejects.jsonl")
    assert (reject["row"], reject["reason"]) == (3, "identical")
    assert reject["data"]["created"] == "2024-01-02 03:04:00" and reject["data"]["blob"] == str(b"\x00\xff")
    assert read_json(Layout(tmp_path).pairs / "manifest.json")["rejected"] == 1

    rows = [dict(r, note="fine") for r in GOOD]
    rows[2].update(rejected=rows[2]["chosen"], note="half an emoji \ud800")
    code, err, path = download(tmp_path, "d.jsonl", lines(rows), capsys)
    assert code == 0, err
    (reject,) = read_jsonl(Layout(tmp_path).pairs / "rejects.jsonl")
    assert reject["row"] == 3 and reject["data"]["note"] == "half an emoji \\ud800"


def test_a_parquet_column_named_twice_is_refused_naming_it(tmp_path, capsys):
    """pyarrow's rows keep the last of two equal column names, as the csv module does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [pa.array([r[k] for r in GOOD]) for k in ("prompt", "chosen", "rejected")]
    pq.write_table(pa.table([*columns, columns[2]], names=["prompt", "chosen", "rejected", "chosen"]),
                   tmp_path / "d.parquet")
    code, _, err = cli(tmp_path, "--set", f"download.source={tmp_path / 'd.parquet'}", "download", capsys=capsys)
    assert_user_error(code, err, f"file {tmp_path / 'd.parquet'}", "the column 'chosen' is named 2 times")
    assert not (Layout(tmp_path).pairs / "manifest.json").exists()


def test_more_rows_rejected_than_max_reject_ratio_is_a_warning_on_the_command_line_too(tmp_path, capsys):
    """Dagster's rejects_ratio check warned past download.max_reject_ratio; the CLI and dvc repro printed only
    the count (20% of a file set aside read as any other download)."""
    same = [{"prompt": f"other {i}", "chosen": "same", "rejected": "same"} for i in range(5)]
    (tmp_path / "d.jsonl").write_bytes(lines(GOOD + same))
    code, out, _ = cli(tmp_path, "--set", f"download.source={tmp_path / 'd.jsonl'}", "download", capsys=capsys)
    assert code == 0
    assert (f"\nwarning: 20.0% of the rows were rejected, more than download.max_reject_ratio (10.0%); the rows and "
            f"reasons are in {Layout(tmp_path).pairs / 'rejects.jsonl'}") in out
    code, out, _ = cli(tmp_path, "--set", f"download.source={tmp_path / 'd.jsonl'}", "--set",
                       "download.max_reject_ratio=0.25", "download", capsys=capsys)
    assert code == 0 and "5 rejected (identical: 5)" in out and "max_reject_ratio" not in out


def test_repeats_the_reader_never_reads_are_left_as_they_are(tmp_path, capsys):
    """A spreadsheet's unnamed trailing columns, a key written twice in metadata: refusing the repeated
    columns and keys of what some format reads refused these too, files that trained before."""
    rows = "".join(f"q{i},good {i},bad {i},,\n" for i in range(20))
    code, err, _ = download(tmp_path, "d.csv", f"prompt,chosen,rejected,,\n{rows}".encode(), capsys)
    assert code == 0, err
    meta = [dict(r, meta={"rater": i}) for i, r in enumerate(GOOD)]
    data = lines(meta).replace(b'"meta": {"rater": 3}', b'"meta": {"rater": 3, "rater": 4}')
    code, err, _ = download(tmp_path, "d.jsonl", data, capsys)
    assert code == 0, err


def test_a_folder_whose_test_file_holds_no_row_says_so(tmp_path, capsys):
    """It said "the source's split 'None' holds no rows": the folder's own file chose the split."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "train.csv").write_text("prompt,chosen,rejected\n" + "".join(f"q{i},a{i},b{i}\n" for i in range(20)))
    (folder / "test.csv").write_text("prompt,chosen,rejected\n")
    code, _, err = cli(tmp_path, "--set", f"download.source={folder}", "download", capsys=capsys)
    assert_user_error(code, err, "no usable pairs for test after reading 20 rows (the source's test split holds no "
                                 "usable pair; none rejected)")


def test_a_message_list_written_as_text_with_a_key_twice_is_set_aside_as_before(tmp_path, capsys):
    """Refusing repeated keys reached the check for message lists written as text: such a row ended the
    step with the traceback of a bare 'content' instead of being set aside."""
    from rm_lib.evaluation import suites

    text = '[{"role": "user", "content": "a", "content": "b"}]'
    code, err, _ = download(tmp_path, "d.jsonl", lines(GOOD + [{"prompt": text, "chosen": "x", "rejected": "y"}]),
                            capsys)
    assert code == 0, err
    assert [r["reason"] for r in read_jsonl(Layout(tmp_path).pairs / "rejects.jsonl")] == ["messages_as_text"]
    rows = [{"prompt": "p", "chosen": ["a"], "rejected": ["b"]}, {"prompt": text, "chosen": ["a"], "rejected": ["b"]}]
    assert suites.read_rows([("s.jsonl", enumerate(rows, start=1))]).skipped == {"messages_as_text": 1}
