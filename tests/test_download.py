import json
import os
import random
from pathlib import Path

import pytest

from rm_lib.errors import DataError
from rm_lib.files import read_json, read_jsonl
from rm_lib.layout import Layout

from conftest import ALPACA, HH, need
from helpers import run_steps, tiny_params, write_jsonl


def test_demo_is_deterministic_and_split_by_prompt(tmp_path):
    a = run_steps(tiny_params("download.demo_pairs=200"), tmp_path / "a", "download")["download"]
    b = run_steps(tiny_params("download.demo_pairs=200"), tmp_path / "b", "download")["download"]
    assert a.content_hash == b.content_hash
    assert a.pairs["train"] + a.pairs["test"] == 200
    train = read_jsonl(tmp_path / "a/data/pairs/train.jsonl")
    test = read_jsonl(tmp_path / "a/data/pairs/test.jsonl")
    def prompts(rows):
        return {json.dumps(r["prompt"]) for r in rows}
    assert not prompts(train) & prompts(test)
    manifest = read_json(tmp_path / "a/data/pairs/manifest.json")
    assert manifest["content_hash"] == a.content_hash and manifest["pairs"] == a.pairs


def test_folder_with_its_own_splits(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(5)]
    write_jsonl(tmp_path / "src/train.jsonl", rows)
    write_jsonl(tmp_path / "src/test.jsonl.gz", rows[:2], gz=True)
    result = run_steps(tiny_params(f"download.source={tmp_path / 'src'}"), tmp_path, "download")["download"]
    assert result.pairs == {"train": 5, "test": 2}


def test_every_row_rejected_is_an_error_that_keeps_the_rejects(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 3)
    with pytest.raises(DataError, match="no usable pairs.*3 rejected"):
        run_steps(tiny_params(f"download.source={tmp_path / 'bad.jsonl'}"), tmp_path, "download")
    assert len(read_jsonl(tmp_path / "data/pairs.rejects.jsonl")) == 3
    assert not (tmp_path / "data/pairs").exists()


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        run_steps(tiny_params(f"download.source={tmp_path / 'nope.jsonl'}"), tmp_path, "download")


def test_hub_source_calls_datasets_load_dataset(tmp_path, monkeypatch):
    """The Hub path is the real datasets.load_dataset call; here it is served from a local file."""
    import datasets

    src = write_jsonl(tmp_path / "hub.jsonl", [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(10)])
    calls = []

    def fake_load(name, subset=None, split=None, revision=None):
        calls.append((name, subset, split, revision))
        return datasets.Dataset.from_json(str(src))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    params = tiny_params("download.source=org/prefs", "download.revision=abc123", "download.test_split=test")
    result = run_steps(params, tmp_path, "download")["download"]
    assert calls == [("org/prefs", None, "train", "abc123"), ("org/prefs", None, "test", "abc123")]
    assert result.pairs == {"train": 10, "test": 10} and result.kind == "hub"


@pytest.mark.slow
def test_real_hh_rlhf_counts_nothing_lost(tmp_path):
    need(HH)
    result = run_steps(tiny_params(f"download.source={HH}"), tmp_path, "download")["download"]
    assert result.rows_read == 1952
    assert result.pairs["train"] + result.pairs["test"] + sum(result.rejects.values()) == 1952
    assert result.rejects == {"empty_side": 3}  # three chosen replies are empty: set aside, written, counted
    pairs = read_jsonl(tmp_path / "data/pairs/train.jsonl") + read_jsonl(tmp_path / "data/pairs/test.jsonl")
    multi_turn = [p for p in pairs if len(p["chosen"]) > 1 or len(p["rejected"]) > 1]
    assert len(multi_turn) == 3  # the transcripts that diverge before the last reply are kept
    assert all(p["prompt"][0]["role"] == "user" for p in pairs)


@pytest.mark.slow
def test_real_alpaca_counts_and_margins(tmp_path):
    need(ALPACA)
    result = run_steps(tiny_params(f"download.source={ALPACA}"), tmp_path, "download")["download"]
    # four rejected answers are a zero-width space alone (rows 328, 1310, 15557, 17889): empty sides
    assert result.pairs["train"] + result.pairs["test"] == 19996 and result.rejects == {"empty_side": 4}
    pair = read_jsonl(tmp_path / "data/pairs/test.jsonl")[0]
    assert 0.2 - 1e-9 <= pair["margin"] <= 1.0


def _prompt_groups(tmp_path, sizes: list[int]):
    """A source whose prompts repeat: one group of `size` pairs per entry (the issue's 75-78% for 20%)."""
    rows = [{"prompt": f"shared prompt {g}", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for g, size in enumerate(sizes) for i in range(size)]
    return write_jsonl(tmp_path / "groups.jsonl", rows)


@pytest.mark.parametrize("seed", range(6))
def test_split_lands_near_test_fraction_when_prompts_repeat(tmp_path, seed):
    src = _prompt_groups(tmp_path, [40, 30, 20] + [1] * 30)
    result = run_steps(tiny_params(f"download.source={src}", f"download.seed={seed}"), tmp_path, "download")["download"]
    realised = result.pairs["test"] / (result.pairs["test"] + result.pairs["train"])
    assert abs(realised - 0.2) <= 0.05, result.pairs
    manifest = read_json(tmp_path / "data/pairs/manifest.json")
    assert manifest["test_fraction_realised"] == pytest.approx(realised)
    train = read_jsonl(tmp_path / "data/pairs/train.jsonl")
    test = read_jsonl(tmp_path / "data/pairs/test.jsonl")
    assert not {json.dumps(r["prompt"]) for r in train} & {json.dumps(r["prompt"]) for r in test}


def test_a_split_off_the_fraction_is_said_and_stops_when_strict(tmp_path):
    src = _prompt_groups(tmp_path, [50, 50])  # the nearest split by prompt is 50%
    result = run_steps(tiny_params(f"download.source={src}"), tmp_path, "download")["download"]
    assert result.pairs == {"train": 50, "test": 50}
    assert "warning: test share 0.50" in result.summary()
    assert "0.50" in read_json(tmp_path / "data/pairs/manifest.json")["split_warning"]
    with pytest.raises(DataError, match=r"test share 0\.50 .*test_fraction 0\.2.*split_tolerance 0\.05"):
        run_steps(tiny_params(f"download.source={src}", "download.strict_split=true"), tmp_path / "s", "download")


def test_every_pair_sharing_one_prompt_is_a_clear_error(tmp_path):
    src = _prompt_groups(tmp_path, [12])
    with pytest.raises(DataError, match="all 12 pairs share one prompt"):
        run_steps(tiny_params(f"download.source={src}"), tmp_path, "download")


def test_split_files_are_recognised_by_exact_name_only(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(10)]
    write_jsonl(tmp_path / "src/tests_data/a.jsonl", rows[:5])
    write_jsonl(tmp_path / "src/testimonials.jsonl", rows[5:])
    result = run_steps(tiny_params(f"download.source={tmp_path / 'src'}"), tmp_path, "download")["download"]
    assert result.pairs == {"train": 8, "test": 2}  # a seeded split of all ten, not a "test" folder
    write_jsonl(tmp_path / "hf/data/train-00000-of-00001.jsonl", rows[:7])
    write_jsonl(tmp_path / "hf/data/test-00000-of-00001.jsonl", rows[7:])
    result = run_steps(tiny_params(f"download.source={tmp_path / 'hf'}"), tmp_path / "o", "download")["download"]
    assert result.pairs == {"train": 7, "test": 3}


def test_a_failed_download_keeps_the_last_good_pairs(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    good = write_jsonl(tmp_path / "good.jsonl", rows)
    run_steps(tiny_params(f"download.source={good}"), tmp_path, "download")
    pairs = tmp_path / "data/pairs"
    before = {p.name: p.read_bytes() for p in pairs.iterdir()}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 3)
    with pytest.raises(DataError, match=f"see {tmp_path / 'data/pairs.rejects.jsonl'}"):
        run_steps(tiny_params(f"download.source={bad}"), tmp_path, "download")
    assert {p.name: p.read_bytes() for p in pairs.iterdir()} == before
    assert len(read_jsonl(tmp_path / "data/pairs.rejects.jsonl")) == 3
    run_steps(tiny_params(f"download.source={good}"), tmp_path, "download")
    assert not (tmp_path / "data/pairs.rejects.jsonl").exists()  # no stale rejects beside a good output


def test_a_local_source_outside_data_sources_is_named_as_invisible_to_dvc(tmp_path):
    from rm_lib.data.sources import untracked_note

    inside = tmp_path / "data/sources/pairs.jsonl"
    inside.parent.mkdir(parents=True)
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    inside.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text(inside.read_text(encoding="utf-8"), encoding="utf-8")
    sources = Layout(tmp_path).sources
    assert untracked_note(inside, sources) is None
    assert "outside" in untracked_note(outside, sources) and "data/sources" in untracked_note(outside, sources)
    # `dvc add` under cache.type symlink leaves a link into .dvc/cache: the file is still kept in data/sources
    cached = tmp_path / ".dvc/cache/files/md5/5e/c48d8bc51f"
    cached.parent.mkdir(parents=True)
    cached.write_text(inside.read_text(encoding="utf-8"), encoding="utf-8")
    (sources / "linked.jsonl").symlink_to(cached)
    assert untracked_note(sources / "linked.jsonl", sources) is None
    assert untracked_note(f"{tmp_path}/data/../data/sources/linked.jsonl", sources) is None
    # data/sources itself a link to another disk: it and what it holds are still data/sources
    disk = tmp_path / "disk"
    (sources).rename(disk)
    sources.symlink_to(disk)
    assert untracked_note(sources, sources) is None and untracked_note(sources / "pairs.jsonl", sources) is None
    sources.unlink()
    disk.rename(sources)
    tracked = run_steps(tiny_params(f"download.source={inside}"), tmp_path, "download")["download"]
    assert tracked.note is None and "dvc repro" not in tracked.summary()
    untracked = run_steps(tiny_params(f"download.source={outside}"), tmp_path, "download")["download"]
    assert "cannot see a change" in untracked.summary()


def test_max_rows_counts_the_rows_of_a_folder_not_of_each_file(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(30)]
    for n, name in enumerate(["a.jsonl", "b.jsonl", "c.jsonl"]):
        write_jsonl(tmp_path / "src" / name, rows[10 * n:10 * n + 10])
    (tmp_path / "src/c.jsonl").write_text("not json\n")  # past the limit: never read
    result = run_steps(tiny_params(f"download.source={tmp_path / 'src'}", "download.max_rows=15"), tmp_path,
                       "download")["download"]
    assert result.rows_read == 15 and sum(result.pairs.values()) == 15
    # a source's own splits count apart: test.jsonl, read first, does not use up train's rows
    write_jsonl(tmp_path / "own/train-00000.jsonl", rows[:10])
    write_jsonl(tmp_path / "own/train-00001.jsonl", rows[10:20])
    write_jsonl(tmp_path / "own/test.jsonl", rows[20:])
    result = run_steps(tiny_params(f"download.source={tmp_path / 'own'}", "download.max_rows=12"), tmp_path / "o",
                       "download")["download"]
    assert result.rows_read == 22 and result.pairs == {"train": 12, "test": 10}


def test_with_its_own_test_file_a_folders_other_files_train(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(30)]
    write_jsonl(tmp_path / "src/train.jsonl", rows[:10])
    write_jsonl(tmp_path / "src/test.jsonl", rows[10:15])
    write_jsonl(tmp_path / "src/extra.jsonl", rows[15:])
    result = run_steps(tiny_params(f"download.source={tmp_path / 'src'}"), tmp_path, "download")["download"]
    assert result.pairs == {"train": 25, "test": 5}
    test = read_jsonl(tmp_path / "data/pairs/test.jsonl")
    assert {p["prompt"][0]["content"] for p in test} == {f"p{i}" for i in range(10, 15)}
    assert read_json(tmp_path / "data/pairs/manifest.json")["split"] == "source"


def test_files_of_a_source_folder_that_are_not_read_are_named(tmp_path, capsys):
    from rm_lib.cli import main

    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(20)]
    write_jsonl(tmp_path / "src/train.jsonl", rows)
    (tmp_path / "src/more.tsv").write_text("prompt\tchosen\trejected\nq\ta\tb\n")
    (tmp_path / "src/notes/readme.txt").parent.mkdir()
    (tmp_path / "src/notes/readme.txt").write_text("about the data\n")
    (tmp_path / "src/.hidden").write_text("")
    # a notebook's checkpoint copy in a hidden folder is no data of the source: it was read as a second copy
    write_jsonl(tmp_path / "src/.ipynb_checkpoints/train-checkpoint.jsonl", rows)
    assert main(["--root", str(tmp_path), "download", "--set", f"download.source={tmp_path / 'src'}"]) == 0
    out = capsys.readouterr().out
    assert read_json(tmp_path / "data/pairs/manifest.json")["rows_read"] == 20
    assert "note: 2 file(s) of the source folder not read, of a type other than .jsonl" in out
    assert "(optionally .gz): more.tsv, notes/readme.txt\n" in out
    assert read_json(tmp_path / "data/pairs/manifest.json")["skipped_files"] == ["more.tsv", "notes/readme.txt"]
    (tmp_path / "src/train.jsonl").unlink()
    with pytest.raises(DataError, match=r"no .jsonl, .json, .parquet, .csv files found in the folder \(of another "
                                        r"type: more.tsv, notes/readme.txt\)"):
        run_steps(tiny_params(f"download.source={tmp_path / 'src'}"), tmp_path, "download")


def test_a_source_folders_linked_subfolder_is_read_and_what_cannot_be_read_is_named(tmp_path):
    """rglob left out in silence a linked subfolder, a subfolder it could not open, a link to a file not
    fetched (DVC, git-annex) and a pipe: half the pairs were gone and the manifest listed nothing."""
    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(40)]
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    write_jsonl(src / "a.jsonl", rows[:20])
    write_jsonl(elsewhere / "b.jsonl", rows[20:])
    (src / "more").symlink_to(elsewhere)
    (src / "loop").symlink_to(src)  # a link back up: read once
    run_steps(tiny_params(f"download.source={src}"), tmp_path, "download")
    manifest = read_json(tmp_path / "data/pairs/manifest.json")
    assert manifest["rows_read"] == 40 and manifest["skipped_files"] == []
    (src / "loop").unlink()

    def refused(path, message):
        with pytest.raises(DataError, match=message) as caught:
            run_steps(tiny_params(f"download.source={src}"), tmp_path, "download")
        assert caught.value.file == str(path)
        path.unlink()
        assert read_json(tmp_path / "data/pairs/manifest.json") == manifest  # the last output as it was

    (src / "c.jsonl").symlink_to(tmp_path / "not-fetched.jsonl")
    refused(src / "c.jsonl", r"is a link to .*not-fetched.jsonl, which does not exist \(a DVC or git-annex file")
    os.mkfifo(src / "d.jsonl")
    refused(src / "d.jsonl", r"is a named pipe \(FIFO\), which a source folder cannot hold")
    os.mkfifo(tmp_path / "pipe.jsonl")  # given as the source itself: it is read more than once
    with pytest.raises(DataError, match=r"is a named pipe \(FIFO\): download and score read a source more than once"):
        run_steps(tiny_params(f"download.source={tmp_path / 'pipe.jsonl'}"), tmp_path, "download")


def test_a_source_file_whose_name_is_not_utf8_is_named_not_a_traceback(tmp_path, capsys):
    from rm_lib.cli import main

    src = tmp_path / "src"
    src.mkdir()
    rows = "".join(json.dumps({"prompt": f"p{i}", "chosen": "good", "rejected": "bad"}) + "\n" for i in range(20))
    (Path(os.fsdecode(bytes(src) + b"/pr\xe9fs.jsonl"))).write_text(rows)
    assert main(["--root", str(tmp_path), "download", "--set", f"download.source={src}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().endswith(
        f"file {src}/pr\\xe9fs.jsonl: the file name is not valid UTF-8, and the pairs and records name their "
        "file: rename it"), err


def test_a_link_to_a_split_folder_of_the_source_leaves_the_split_its_name(tmp_path):
    """src/{train, test, heldout -> test}: the link sorts first, and test/'s file came back as heldout/b.jsonl,
    no split of its own: the user's test set was pooled and partly trained on."""
    from rm_lib.data import sources

    src = tmp_path / "src"
    pairs = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(25)]
    write_jsonl(src / "train" / "a.jsonl", pairs[:20])
    write_jsonl(src / "test" / "b.jsonl", pairs[20:])
    (src / "heldout").symlink_to(src / "test")
    files = sources.local_files(src)
    assert files == [src / "test" / "b.jsonl", src / "train" / "a.jsonl"]
    assert [sources.split_of(f, src) for f in files] == ["test", "train"]


def test_files_of_a_source_folder_that_are_never_read_stop_nothing(tmp_path):
    """A DataLad or git-annex dataset with only its .jsonl files fetched (README.md a link to nothing), a
    socket, a name that is not UTF-8: none is data, and none stopped download before; they are listed
    as not read."""
    import socket

    src = tmp_path / "src"
    write_jsonl(src / "a.jsonl", [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(20)])
    (src / "README.md").symlink_to(tmp_path / ".git/annex/objects/README.md")
    Path(os.fsdecode(bytes(src) + b"/notes-\xe9.txt")).write_text("notes")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(src / "agent.sock"))
        run_steps(tiny_params(f"download.source={src}"), tmp_path, "download")
    manifest = read_json(tmp_path / "data/pairs/manifest.json")
    assert manifest["rows_read"] == 20 and manifest["skipped_files"] == ["README.md", "notes-\\xe9.txt"]


def test_a_source_subfolder_that_cannot_be_opened_is_named(tmp_path, monkeypatch):
    """As a user without permission on it meets it (root, who runs the tests here, opens any folder)."""
    src = tmp_path / "src"
    write_jsonl(src / "a.jsonl", [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(20)])
    (src / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"cannot read the folder .*locked \(Permission denied\): its files would be "
                                        "left out"):
        run_steps(tiny_params(f"download.source={src}"), tmp_path, "download")


@pytest.mark.parametrize("setting", ["download.subset=harmless", "download.test_split=test",
                                     "download.train_split=validation", "download.revision=abc123"])
def test_hub_settings_with_a_local_source_or_the_demo_are_refused(tmp_path, setting):
    """They name nothing there, and the manifest and the card would quote them as if they had chosen the data."""
    from rm_lib.errors import SettingsError

    source = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"}
                                                    for i in range(20)])
    key = setting.split(".")[1].split("=")[0]
    back = f"download.{key}={'train' if key == 'train_split' else 'null'}"  # what the message says to set
    for where in (f"download.source={source}", "download.source=demo"):
        with pytest.raises(SettingsError, match=rf"download.{key}: applies to a Hub "
                                                r"dataset (or a local folder \(.*\) )?only") as caught:
            run_steps(tiny_params(where, setting), tmp_path, "download")
        assert str(caught.value).endswith(f"set {back}")
    assert not (tmp_path / "data").exists()
    run_steps(tiny_params(f"download.source={source}", back), tmp_path, "download")  # and that setting is taken


def test_a_folder_in_the_hubs_layout_says_its_split_files_and_takes_them_when_named(tmp_path, capsys):
    """HuggingFaceH4/ultrafeedback_binarized as its repository holds it: data/train_prefs-…, data/test_prefs-….
    Pooled unasked, the held-out file would be trained on: the summary says so, and the settings name them."""
    from rm_lib.cli import main

    src = tmp_path / "src/data"
    write_jsonl(src / "train_prefs-00000-of-00001.jsonl", [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"}
                                                           for i in range(20)])
    write_jsonl(src / "test_prefs-00000-of-00001-0a1b2c3d4e5f6789.jsonl",
                [{"prompt": f"t{i}", "chosen": "good", "rejected": "bad"} for i in range(5)])
    write_jsonl(src / "train_gen.jsonl", [{"prompt": "g", "chosen": "good", "rejected": "bad"}])
    source = f"download.source={tmp_path / 'src'}"
    assert main(["--root", str(tmp_path), "download", "--set", source]) == 0
    assert ("warning: data/test_prefs-00000-of-00001-0a1b2c3d4e5f6789.jsonl, data/train_gen.jsonl, "
            "data/train_prefs-00000-of-00001.jsonl named like a split but read as one pool split by prompt; to use a "
            "folder's own splits, set download.train_split and download.test_split") in capsys.readouterr().out
    run_steps(tiny_params(source, "download.train_split=train_prefs", "download.test_split=test_prefs"), tmp_path,
              "download")
    pairs = Layout(tmp_path).pairs
    assert [p["prompt"][0]["content"] for p in read_jsonl(pairs / "test.jsonl")] == [f"t{i}" for i in range(5)]
    assert len(read_jsonl(pairs / "train.jsonl")) == 20  # train_gen is another split: not read
    manifest = read_json(pairs / "manifest.json")
    assert manifest["split"] == "source" and manifest["unnamed_splits"] == []
    with pytest.raises(DataError, match=r"no file of split 'test_sft' .*; the files name: test_prefs, train_gen, "
                                        "train_prefs"):
        run_steps(tiny_params(source, "download.train_split=train_prefs", "download.test_split=test_sft"), tmp_path,
                  "download")


def test_json_lines_in_a_json_file_are_read_and_a_saved_dataset_folder_says_how_to_export(tmp_path):
    """Dataset.to_json writes JSON Lines under the name the user gives (stanfordnlp/SHP's files are
    train.json); save_to_disk writes Arrow files, which download does not read."""
    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(20)]
    source = write_jsonl(tmp_path / "src/train.json", rows)
    assert run_steps(tiny_params(f"download.source={source}"), tmp_path, "download")["download"].rows_read == 20
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("dataset_info.json", "state.json"):
        (saved / name).write_text("{}")
    (saved / "data-00000-of-00001.arrow").write_bytes(b"")
    with pytest.raises(DataError, match=r"save_to_disk wrote .*dataset.to_parquet\('train.parquet'\)"):
        run_steps(tiny_params(f"download.source={saved}"), tmp_path, "download")


def test_the_summary_gives_the_range_of_the_margins_that_training_adds(tmp_path, capsys):
    """UltraFeedback's 1-10 ratings become margins of up to 9 logits, unlike a 0-1 judge's: the user sees it."""
    from rm_lib.cli import main

    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad", "score_chosen": 9.0, "score_rejected": 1.0 + i % 9}
            for i in range(20)]
    source = write_jsonl(tmp_path / "src/train.jsonl", rows)
    assert main(["--root", str(tmp_path), "download", "--set", f"download.source={source}"]) == 0
    assert ("\nmargins: 18 pairs carry one, 1 to 8; training adds them to the reward difference it asks for "
            "(train.use_margin=false ignores them)\n") in capsys.readouterr().out
    assert read_json(tmp_path / "data/pairs/manifest.json")["margins"] == {"pairs": 18, "min": 1.0, "max": 8.0}
    assert read_json(tmp_path / "data/pairs/manifest.json")["rejects_by_reason"] == {"tied_scores": 2}


def _texts(path) -> list[tuple]:
    return [(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"])
            for p in read_jsonl(path)]


def _split_of(tmp_path, name: str, rows: list[dict]) -> dict[str, list[tuple]]:
    src = write_jsonl(tmp_path / name / "src.jsonl", rows)
    run_steps(tiny_params(f"download.source={src}"), tmp_path / name, "download")
    return {s: _texts(tmp_path / name / f"data/pairs/{s}.jsonl") for s in ("train", "test")}


def _moved(old: dict, new: dict) -> int:
    return len(set(old["test"]) & set(new["train"]))


def test_the_held_out_pairs_stay_held_out_when_rows_are_added_removed_or_reordered(tmp_path):
    """Each prompt's place in the seeded order is its own hash: a new prompt can push one old test pair
    past the end of the test set, never reshuffle the rest into train (where the last release was tested)."""
    rows = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(1000)]
    old = _split_of(tmp_path, "old", rows)
    assert len(old["test"]) == 200
    new_rows = [{"prompt": f"new question {i}", "chosen": "good", "rejected": "bad"} for i in range(50)]
    changed = {"append_1": rows + new_rows[:1], "append_50": rows + new_rows, "remove_last": rows[:-1],
               "remove_one": rows[:500] + rows[501:], "reorder": random.Random(1).sample(rows, len(rows))}
    for name, changed_rows in changed.items():
        new = _split_of(tmp_path, name, changed_rows)
        pushed_in = len(set(new["test"]) - {(r["prompt"], r["chosen"], r["rejected"]) for r in rows})
        shrunk = max(0, len(old["test"]) - len(new["test"]))
        # an old test pair leaves only to make room for a new pair ranked before it, or as the test set shrinks
        assert _moved(old, new) <= pushed_in + shrunk, name
    assert sorted(new["test"]) == sorted(old["test"])  # reordered rows: the same test set


def test_with_repeated_prompts_a_change_moves_test_pairs_only_at_the_end_of_the_test_set(tmp_path):
    """Provable bound: the changed rows plus three times the largest prompt's pairs (the test set's last
    whole prompts, those that filled its gap, and the one taken to come closest to test_fraction)."""
    rng = random.Random(0)
    rows = [{"prompt": f"shared prompt {g}", "chosen": f"good {g}.{i}", "rejected": f"bad {g}.{i}"}
            for g in range(150) for i in range(rng.randint(1, 6))]
    old = _split_of(tmp_path, "old", rows)
    more = [{"prompt": f"shared prompt {g}", "chosen": "also good", "rejected": "also bad"} for g in (3, 70, 140)]
    more += [{"prompt": f"another prompt {g}", "chosen": "good", "rejected": "bad"} for g in range(2)]
    for name, changed_rows, changed in (("append", rows + more, 5), ("remove", rows[:10] + rows[12:], 2)):
        assert _moved(old, _split_of(tmp_path, name, changed_rows)) <= changed + 3 * 6, name


def _alike_rows() -> list[dict]:
    """40 prompts; for 10 of them, copies alike but for case, spaces or Unicode form, an exact repeat
    and one with chosen and rejected exchanged."""
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}", "rejected": f"bad answer {i}"}
            for i in range(40)]
    for i in range(10):
        rows += [{"prompt": f"  question   {i}? ", "chosen": f"good answer {i}", "rejected": f"Bad answer {i}"},
                 {"prompt": f"\uff31uestion {i}?", "chosen": f"Good answer {i}", "rejected": f"bad answer {i}"},
                 rows[i], {"prompt": f"Question {i}?", "chosen": f"bad answer {i}", "rejected": f"Good answer {i}"}]
    return rows


def test_prompts_alike_but_for_case_and_spaces_stay_on_one_side(tmp_path):
    """The default tokenizer is uncased: such prompts are one prompt to the model."""
    from rm_lib.evaluation import quality

    src = write_jsonl(tmp_path / "src.jsonl", _alike_rows())
    run_steps(tiny_params(f"download.source={src}"), tmp_path, "download")
    key = lambda text: " ".join(text.replace("\uff31", "Q").lower().split())  # noqa: E731
    sides = {s: {key(p[0]) for p in _texts(tmp_path / f"data/pairs/{s}.jsonl")} for s in ("train", "test")}
    assert not sides["train"] & sides["test"]
    overlap = quality.no_prompt_overlap(Layout(tmp_path))
    assert overlap.passed and overlap.metadata["train_prompts"] + overlap.metadata["test_prompts"] == 40

    # a source's own splits are taken as they are: the check finds the prompts they share
    write_jsonl(tmp_path / "own/train.jsonl", _alike_rows()[:40])
    write_jsonl(tmp_path / "own/test.jsonl", _alike_rows()[40:42] + [{"prompt": "QUESTION 1?", "chosen": "a",
                                                                        "rejected": "b"}])
    run_steps(tiny_params(f"download.source={tmp_path / 'own'}"), tmp_path / "o", "download")
    overlap = quality.no_prompt_overlap(Layout(tmp_path / "o"))
    assert not overlap.passed and overlap.metadata["shared_prompts"] == 2


def test_repeated_and_exchanged_pairs_are_kept_and_counted(tmp_path):
    """A repeat or a copy with its sides exchanged may be meant, or a mistake: kept, but counted where the
    user reads; a test pair equal to a train pair in either order is counted as trained on."""
    rows = _alike_rows()
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    result = run_steps(tiny_params(f"download.source={src}"), tmp_path, "download")["download"]
    assert sum(result.pairs.values()) == len(rows)
    manifest = read_json(tmp_path / "data/pairs/manifest.json")
    assert sum(manifest["duplicate_pairs"].values()) == 30  # four alike per prompt: three repeat the first
    assert sum(manifest["swapped_pairs"].values()) == 50  # the four and their exchanged copy
    assert manifest["test_pairs_in_train"] == 0
    assert "30 pairs (train " in result.summary() and "50 pairs (train " in result.summary()

    write_jsonl(tmp_path / "own/train.jsonl", rows[:40])
    write_jsonl(tmp_path / "own/test.jsonl", rows[40:42] + rows[43:44] + [rows[39]])
    result = run_steps(tiny_params(f"download.source={tmp_path / 'own'}"), tmp_path / "o", "download")["download"]
    manifest = read_json(tmp_path / "o/data/pairs/manifest.json")
    assert (manifest["test_pairs_in_train"], manifest["test_pairs_swapped_in_train"]) == (4, 1)
    assert "warning: 4 of the 4 test pairs are also train pairs (1 with chosen and rejected exchanged)" in (
        result.summary())


def _pretokenized(prompts: int) -> list[dict]:
    """Pairs of token ids that open alike (a template's tokens), then a prompt; half the pairs' answers
    also begin alike."""
    rng = random.Random(0)
    rows = []
    for p in range(prompts):
        prompt = [1, 2, 3, 100 + p, 200 + p % 7, 9]
        for j in range(4):
            chosen = [rng.randrange(1000, 2000) for _ in range(5)]
            rejected = chosen[:2] * (j % 2) + [rng.randrange(2000, 3000) for _ in range(5)]
            rows.append({"input_ids_chosen": prompt + chosen, "input_ids_rejected": prompt + rejected})
    return rows


def test_pretokenized_pairs_are_split_by_the_tokens_both_sides_begin_with(tmp_path):
    from rm_lib.evaluation import quality

    src = write_jsonl(tmp_path / "src.jsonl", _pretokenized(30))
    result = run_steps(tiny_params(f"download.source={src}"), tmp_path, "download")["download"]
    assert result.pairs == {"train": 96, "test": 24}
    prompts = {s: {p["input_ids_chosen"][3] for p in read_jsonl(tmp_path / f"data/pairs/{s}.jsonl")}
               for s in ("train", "test")}
    assert not prompts["train"] & prompts["test"]
    overlap = quality.no_prompt_overlap(Layout(tmp_path))
    assert overlap.passed and overlap.metadata["test_prompts"] == 6

    # pairs whose sides share nothing but the opening leave no prompt to compare: not a pass
    apart = [{"input_ids_chosen": [1, 2, 3, 10 + i], "input_ids_rejected": [1, 2, 3, 50 + i]} for i in range(10)]
    write_jsonl(tmp_path / "own/train.jsonl", apart[:8])
    write_jsonl(tmp_path / "own/test.jsonl", apart[8:])
    run_steps(tiny_params(f"download.source={tmp_path / 'own'}"), tmp_path / "o", "download")
    overlap = quality.no_prompt_overlap(Layout(tmp_path / "o"))
    assert not overlap.passed and overlap.description.startswith("not checked") and overlap.warn_only


def test_a_split_off_the_fraction_for_too_few_pairs_says_so(tmp_path):
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"}
                                               for i in range(3)])
    result = run_steps(tiny_params(f"download.source={src}"), tmp_path, "download")["download"]
    assert result.warning.endswith("too few pairs (with 3, the nearest share is 0.33)"), result.warning


def test_download_of_a_large_source_says_how_many_rows_it_has_read_now_and_then(tmp_path, monkeypatch, capsys):
    """200,000 pairs took download a minute without a line: one now and then says how many rows are read."""
    from rm_lib import progress

    source = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"q{i}?", "chosen": "yes", "rejected": "no"}
                                                    for i in range(5)])
    clock = iter(range(0, 100_000, 20))  # each look at the clock: 20 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    run_steps(tiny_params(f"download.source={source}"), tmp_path, "download")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("download: ")]
    assert lines[:2] == ["download: 2 rows read, 0 min 40 s so far", "download: 4 rows read, 1 min 20 s so far"]
