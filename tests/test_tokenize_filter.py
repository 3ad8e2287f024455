import json
import re

import pytest

from rm_lib.data import length_filter, templates, tokenization
from rm_lib.data.tokenstore import read_rows, token_length
from rm_lib.files import read_json
from rm_lib.model.modeling import load_tokenizer

from conftest import ALPACA, HH, need
from helpers import run_steps, tiny_params, write_jsonl

PAIR = {"id": "x:1", "prompt": [{"role": "user", "content": "how are you"}],
        "chosen": [{"role": "assistant", "content": "fine thanks"}],
        "rejected": [{"role": "assistant", "content": "a b c"}], "margin": None}


def test_no_doubled_bos_with_a_template_that_writes_bos(tiny_decoder):
    tok = load_tokenizer(str(tiny_decoder))
    assert tok.pad_token_id != tok.eos_token_id  # the model pads with its EOS; load_tokenizer adds a pad
    text = templates.render(PAIR["prompt"] + PAIR["chosen"], "tokenizer", tok)
    assert text.startswith("<s>")
    # The trap: rendered text tokenized again with special tokens gives two BOS.
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2
    row, = tokenization.tokenize_batch([PAIR], tok, "tokenizer", tokenization.special_tokens(tok))
    for side in ("chosen", "rejected"):
        ids = row[f"input_ids_{side}"]
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        assert ids.count(tok.bos_token_id) == 1
        assert ids[-1] == tok.eos_token_id
    # the prompt length counts the one BOS once: the prompt ends at the generation prompt
    assert row["input_ids_chosen"][row["prompt_length"] - 1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert row["input_ids_chosen"][row["prompt_length"]] != tok.convert_tokens_to_ids("<|assistant|>")


def test_a_chat_template_that_refuses_a_pair_names_it_and_the_way_on(tiny_decoder):
    """Gemma's template raises on a system turn, Mistral's on turns that do not alternate."""
    from rm_lib.errors import DataError

    tok = load_tokenizer(str(tiny_decoder))
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + tok.chat_template)
    pair = {**PAIR, "id": "data.jsonl:7", "prompt": [{"role": "system", "content": "be brief"}, *PAIR["prompt"]]}
    with pytest.raises(DataError, match=r"chat template refused pair data.jsonl:7 \(source file:row\), prompt with "
                                        r"turns system user: System role not supported; set tokenize.template="):
        tokenization.tokenize_batch([PAIR, pair], tok, "tokenizer", tokenization.special_tokens(tok))


def test_pairs_a_chat_template_refuses_are_set_aside_counted_and_scored_as_rejects(tmp_path, tiny_decoder):
    """One row of hh-rlhf with two assistant turns in a row stopped tokenize for the whole set under
    Mistral's template. Such pairs are set aside with the template's words, counted with the filter's
    reasons (the held-out figures are of the others), and score puts them in its rejects; tokenize stops
    only where the template refuses every pair of a split."""
    import shutil

    from rm_lib.errors import DataError
    from rm_lib.layout import Layout
    from rm_lib.model.modeling import load_reward_model, save_model
    from rm_lib.steps import score

    folder = tmp_path / "no-system"
    shutil.copytree(tiny_decoder, folder)
    tok = load_tokenizer(str(folder))
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + tok.chat_template)
    tok.save_pretrained(folder)
    system = [{"role": "system", "content": "be brief"}]
    rows = [{"prompt": (system if i % 4 == 0 else []) + [{"role": "user", "content": f"how are you {i}"}],
             "chosen": [{"role": "assistant", "content": "fine thanks"}],
             "rejected": [{"role": "assistant", "content": "a b"}]} for i in range(20)]
    src = write_jsonl(tmp_path / "src/pairs.jsonl", rows)
    params = tiny_params(f"download.source={tmp_path / 'src'}", "download.test_fraction=0.25",
                         "tokenize.template=tokenizer", model=str(folder))
    res = run_steps(params, tmp_path / "p", "download", "tokenize", "filter")
    refused = [json.loads(line) for line in (tmp_path / "p/data/tokenized/refused.jsonl").read_text().splitlines()]
    assert sorted(int(r["id"].rsplit(":", 1)[1]) for r in refused) == [1, 5, 9, 13, 17]  # 1-based source rows
    assert {r["reason"] for r in refused} == {"template_refused"}
    assert all("System role not supported" in r["why"] for r in refused)
    counted = res["tokenize"].refused
    assert sum(counted.values()) == 5 and sum(res["tokenize"].rows.values()) == 15
    assert f"warning: the chat template refused 5 pair(s) ({counted['train']} train, {counted['test']} test)" \
        in res["tokenize"].summary()
    dropped = read_json(tmp_path / "p/data/filtered/manifest.json")["dropped_by_reason"]
    assert {split: dropped[split].get("template_refused", 0) for split in counted} == counted
    assert sum(r["reason"] == "template_refused" for r in
               map(json.loads, (tmp_path / "p/data/filtered/dropped.jsonl").read_text().splitlines())) == 5
    from rm_lib.publish.model_card import _template_notes

    assert _template_notes({"template_refused": counted}) == (
        f"\n- Chat template: it refused {counted['train']} training and {counted['test']} held-out pairs, set aside")
    # score sets them aside as its rejects
    save_model(load_reward_model(str(folder), pad_token_id=tok.pad_token_id), tok, tmp_path / "rm",
               chat_template=True)
    (tmp_path / "rm/rm_lib.json").write_text(json.dumps({"template": "tokenizer"}))
    result = score.run_file(params, Layout(tmp_path / "p"), model=str(tmp_path / "rm"), input_path=str(src),
                            output_path=str(tmp_path / "scores.jsonl"))
    assert result.reasons == {"template_refused": 5} and len((tmp_path / "scores.jsonl").read_text().splitlines()) == 15
    # every pair refused: stopped, with the template's words, the earlier output as it was
    write_jsonl(src, [{**row, "prompt": system + row["prompt"][-1:]} for row in rows])
    run_steps(params, tmp_path / "p", "download")
    with pytest.raises(DataError, match="the chat template refused every train pair; the first: the tokenizer's chat "
                                        "template refused pair .*System role not supported"):
        run_steps(params, tmp_path / "p", "tokenize")
    assert len((tmp_path / "p/data/tokenized/refused.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize("template", ["simple_chat", "simple_concat", "chatml"])
def test_named_templates_get_one_bos_and_an_eos(tiny_decoder, template):
    tok = load_tokenizer(str(tiny_decoder))
    row, = tokenization.tokenize_batch([PAIR], tok, template, tokenization.special_tokens(tok))
    for side in ("chosen", "rejected"):
        ids = row[f"input_ids_{side}"]
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    if template != "simple_concat":
        assert row["input_ids_chosen"][:row["prompt_length"]] == row["input_ids_rejected"][:row["prompt_length"]]


def test_bert_without_eos_gets_cls_and_sep(minilm_path):
    tok = load_tokenizer(minilm_path)
    assert templates.resolve("auto", tok) == "simple_chat"  # no template of its own
    row, = tokenization.tokenize_batch([PAIR], tok, "simple_chat", tokenization.special_tokens(tok))
    ids = row["input_ids_chosen"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and ids.count(tok.cls_token_id) == 1


def test_a_pretokenized_pair_that_ends_with_the_eos_gets_no_second_one(tiny_decoder):
    tok = load_tokenizer(str(tiny_decoder))
    eos = tok.eos_token_id
    pair = {"id": "p:1", "input_ids_chosen": [tok.bos_token_id, 7, 8, eos], "input_ids_rejected": [tok.bos_token_id, 9]}
    row, = tokenization.tokenize_batch([pair], tok, "simple_chat", tokenization.special_tokens(tok))
    assert row["input_ids_chosen"] == [tok.bos_token_id, 7, 8, eos]
    assert row["input_ids_rejected"] == [tok.bos_token_id, 9, eos]


def test_pretokenized_pairs_pass_through_with_eos(tiny_decoder):
    tok = load_tokenizer(str(tiny_decoder))
    pair = {"id": "p:1", "input_ids_chosen": [tok.bos_token_id, 7, 8], "input_ids_rejected": [tok.bos_token_id, 9],
            "margin": 1.0}
    row, = tokenization.tokenize_batch([pair], tok, "simple_chat", tokenization.special_tokens(tok))
    assert row["input_ids_chosen"] == [tok.bos_token_id, 7, 8, tok.eos_token_id] and row["margin"] == 1.0


def test_parallel_tokenization_gives_the_same_rows(minilm_path):
    tok = load_tokenizer(minilm_path)
    pairs = [dict(PAIR, id=f"x:{i}") for i in range(6)]
    one = tokenization.tokenize_pairs(pairs, tok, "simple_chat", batch_size=2)
    two = tokenization.tokenize_pairs(pairs, tok, "simple_chat", batch_size=2, num_proc=2, tokenizer_path=minilm_path)
    assert one == two


def test_parallel_tokenization_from_the_command_line_finishes(tmp_path):
    """The CLI sets TOKENIZERS_PARALLELISM; workers forked after the tokenizer had run its thread pool
    waited for ever on it (the first batch never came back). They are spawned now."""
    import subprocess
    import sys

    from helpers import offline_env

    cli = [sys.executable, "-m", "rm_lib", "--root", str(tmp_path)]
    subprocess.run([*cli, "download", "--set", "download.demo_pairs=120"], check=True, capture_output=True,
                   env=offline_env())
    env = {k: v for k, v in offline_env().items() if k != "TOKENIZERS_PARALLELISM"}  # as a user's shell has it
    done = subprocess.run([*cli, "tokenize", "--set", "tokenize.num_proc=2", "--set", "tokenize.batch_size=7"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0 and "train 96 / test 24 pairs" in done.stdout, done.stderr[-1000:]


def _row(prompt, chosen, rejected):
    return {"id": "r", "prompt_length": prompt, "input_ids_chosen": [101] + list(range(2, chosen)) + [102],
            "input_ids_rejected": [101] + list(range(50, 48 + rejected)) + [102], "margin": None}


def test_drop_policy_counts_every_reason():
    rows = [_row(3, 10, 10), _row(9, 10, 10), _row(3, 30, 10), _row(3, 10, 30), _row(3, 30, 30)]
    out = length_filter.apply(rows, max_len=20, max_prompt=5, policy="drop", keep_front=1)
    assert len(out.kept) == 1
    assert out.dropped_by_reason == {"prompt_too_long": 1, "chosen_too_long": 1, "rejected_too_long": 1,
                                     "both_too_long": 1}


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_a_pair_at_the_limits_is_kept_whole_and_one_token_past_them_is_not(policy):
    """max_token_length and max_prompt_token_length are the most tokens kept: a side of exactly that many
    is kept as it is; one more is dropped or cut to exactly the limit."""
    at = [_row(5, 20, 20), _row(5, 20, 11), _row(3, 11, 20)]
    out = length_filter.apply(at, max_len=20, max_prompt=5, policy=policy, keep_front=1)
    assert out.kept == [{**r, "length_chosen": len(r["input_ids_chosen"]),
                         "length_rejected": len(r["input_ids_rejected"])} for r in at]
    assert not out.dropped and out.truncated == 0
    past = [_row(6, 10, 11), _row(3, 21, 11), _row(3, 11, 21), _row(3, 21, 21)]
    out = length_filter.apply(past, max_len=20, max_prompt=5, policy=policy, keep_front=1)
    if policy == "drop":
        assert not out.kept and [d["reason"] for d in out.dropped] == [
            "prompt_too_long", "chosen_too_long", "rejected_too_long", "both_too_long"]
    else:
        assert len(out.kept) == 4 and out.truncated == 4 and not out.dropped
        assert [r["prompt_length"] for r in out.kept] == [5, 2, 2, 2]  # a cut takes the oldest prompt tokens
        for row, cut in zip(past[1:], out.kept[1:]):
            for side in ("chosen", "rejected"):
                assert len(cut[f"input_ids_{side}"]) == min(len(row[f"input_ids_{side}"]), 20)


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_pairs_with_the_same_ids_are_set_aside_and_counted(policy):
    """Texts that differ only where the tokenizer does not look (case, spaces) give one sequence twice:
    nothing to learn, a sure tie in evaluation. Set aside as identical_tokens, written with the others."""
    same = _row(3, 10, 10)
    same["input_ids_rejected"] = list(same["input_ids_chosen"])
    out = length_filter.apply([same, _row(3, 10, 12)], max_len=20, max_prompt=5, policy=policy, keep_front=1)
    assert len(out.kept) == 1 and out.dropped_by_reason == {"identical_tokens": 1}
    assert out.dropped[0]["id"] == "r" and out.dropped[0]["chosen_length"] == 10


def test_truncate_policy_keeps_start_token_and_the_end():
    row = _row(12, 40, 30)
    out = length_filter.apply([row], max_len=20, max_prompt=8, policy="truncate", keep_front=1)
    kept, = out.kept
    assert out.truncated == 1 and not out.dropped
    for side in ("chosen", "rejected"):
        ids = kept[f"input_ids_{side}"]
        assert len(ids) <= 20 and ids[0] == 101 and ids[-1] == 102
        assert ids[-5:] == row[f"input_ids_{side}"][-5:]
        assert len(kept[f"attention_mask_{side}"]) == len(ids)
        assert token_length(kept, side) == len(row[f"input_ids_{side}"])  # the length before the cut


def test_a_bos_only_the_chat_template_writes_is_kept_by_every_cut(tmp_path, tiny_decoder):
    """A tokenizer that adds no BOS beside a template that writes one: the filter's cut, and score's and the
    scorer's after it, removed the BOS with the prompt's start, so most cut sequences began mid-text."""
    import shutil

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from rm_lib.evaluation.scoring import RewardScorer
    from rm_lib.model.modeling import load_reward_model, save_model

    folder = tmp_path / "no-bos-added"
    shutil.copytree(tiny_decoder, folder)
    saved = PreTrainedTokenizerFast.from_pretrained(folder)
    backend = Tokenizer.from_str(saved.backend_tokenizer.to_str())
    backend.post_processor = None  # the template's {{ bos_token }} is the only BOS
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                    pad_token="</s>")
    plain.chat_template = saved.chat_template
    plain.save_pretrained(folder)
    bos = plain.bos_token_id
    assert plain("a b")["input_ids"][0] != bos and tokenization.special_tokens(plain).prefix == ()
    params = tiny_params("filter.policy=truncate", "filter.max_token_length=24", "filter.max_prompt_token_length=10",
                         model=str(folder))
    run_steps(params, tmp_path / "p", "download", "tokenize", "filter")
    cut = [r for split in ("train", "test") for r in read_rows(tmp_path / f"p/data/filtered/{split}.parquet")
           if len(r["input_ids_chosen"]) < token_length(r, "chosen")]
    assert cut
    for row in cut:
        for side in ("chosen", "rejected"):
            ids = row[f"input_ids_{side}"]
            assert ids[0] == bos and bos not in ids[1:] and len(ids) <= 24, row["id"]
    # the scorer cuts a long conversation the same way
    save_model(load_reward_model(str(folder), pad_token_id=plain.pad_token_id), plain, tmp_path / "rm",
               chat_template=True)
    scorer = RewardScorer(tmp_path / "rm", template="tokenizer", max_length=24)
    chat = [{"role": "user", "content": "the film " * 30}, {"role": "assistant", "content": "it was good"}]
    fitted, was_cut = scorer.fit(scorer.encode(chat), "chat")
    assert was_cut and fitted[0] == bos and len(fitted) == 24


def test_truncation_keeps_the_prompt_both_sides_still_share_and_records_what_it_sets_aside():
    """prompt_length after a cut was the chosen side's, though the longer rejected side lost more of its
    prompt: it is now the prompt tokens left in the side cut more. A pair the cut made identical was
    written without its lengths."""
    prompt = [101] + list(range(200, 211))  # 12 tokens both sides begin with
    row = {"id": "r", "prompt_length": 12, "input_ids_chosen": prompt + [1, 2, 3, 102],
           "input_ids_rejected": prompt + list(range(300, 318)) + [102]}  # the rejected side is cut the more
    kept, = length_filter.apply([row], max_len=20, max_prompt=12, policy="truncate", keep_front=1).kept
    removed = {side: len(row[f"input_ids_{side}"]) - len(kept[f"input_ids_{side}"]) for side in ("chosen", "rejected")}
    assert removed["rejected"] > removed["chosen"] and kept["prompt_length"] == 12 - removed["rejected"]
    same_end = {"id": "e", "prompt_length": 3, "input_ids_chosen": [101, 7, 8, 9, 5, 6, 102],
                "input_ids_rejected": [101, 7, 8, 10, 5, 6, 102]}
    out = length_filter.apply([same_end], max_len=4, max_prompt=3, policy="truncate", keep_front=1)
    assert out.dropped == [{"id": "e", "reason": "identical_after_truncation", "prompt_length": 3,
                            "chosen_length": 7, "rejected_length": 7}]


def test_a_filter_that_keeps_no_pair_gives_advice_for_its_reasons(tmp_path):
    from rm_lib.errors import DataError

    run_steps(tiny_params(), tmp_path, "download", "tokenize")
    with pytest.raises(DataError, match=r"no train pair is left .*raise filter.max_token_length \(and "
                                        r"filter.max_prompt_token_length\) or use filter.policy=truncate"):
        run_steps(tiny_params("filter.max_token_length=4", "filter.max_prompt_token_length=2"), tmp_path, "filter")


def test_pipeline_writes_counts_rejects_and_plot(tmp_path):
    res = run_steps(tiny_params("filter.max_token_length=40"), tmp_path, "download", "tokenize", "filter")
    f = res["filter"]
    for split in ("train", "test"):
        assert f.kept[split] + sum(f.dropped[split].values()) == res["tokenize"].rows[split]
    assert (tmp_path / "data/filtered/lengths.png").stat().st_size > 1000
    assert len(read_rows(tmp_path / "data/filtered/train.parquet")) == f.kept["train"]
    # every pair set aside is written where the user can see it, with its reason
    aside = [json.loads(line) for line in (tmp_path / "data/filtered/dropped.jsonl").read_text().splitlines()]
    counted = sum(sum(f.dropped[split].values()) for split in ("train", "test"))
    assert counted > 1 and len(aside) == counted and all(row["reason"] for row in aside)


def _through_filter(tmp_path, source, *extra: str):
    res = run_steps(tiny_params(f"download.source={source}", "filter.max_token_length=512",
                                "filter.max_prompt_token_length=384", *extra), tmp_path,
                    "download", "tokenize", "filter")
    d, t, f = res["download"], res["tokenize"], res["filter"]
    for split in ("train", "test"):
        assert t.rows[split] == d.pairs[split]
        assert f.kept[split] + sum(f.dropped[split].values()) == t.rows[split]
    rows = read_rows(tmp_path / "data/filtered/test.parquet")
    assert all(r["input_ids_chosen"][0] == 101 and r["input_ids_chosen"][-1] == 102 for r in rows)
    assert all(len(r["input_ids_chosen"]) <= 512 and len(r["input_ids_rejected"]) <= 512 for r in rows)
    return res


@pytest.mark.slow
def test_real_hh_rlhf_through_filter(tmp_path):
    res = _through_filter(tmp_path, need(HH))
    assert sum(res["filter"].kept.values()) > 1800


@pytest.mark.slow
def test_real_alpaca_through_filter(tmp_path):
    # 5,000 of the 20,000 rows: long answers to drop are among them, and CI stays short
    # (tests/test_download.py counts the whole file)
    res = _through_filter(tmp_path, need(ALPACA), "download.max_rows=5000")
    dropped = sum(sum(v.values()) for v in res["filter"].dropped.values())
    rejected = sum(res["download"].rejects.values())  # row 328 and 1310: a zero-width space for an answer
    assert dropped > 0 and sum(res["filter"].kept.values()) + dropped + rejected == 5000 and rejected == 2


def test_test_pairs_with_the_ids_of_a_train_pair_are_counted(tmp_path):
    """The default tokenizer drops accents, which download's comparison of texts keeps: the ids tell."""
    rows = [{"prompt": f"Where is café {i}?", "chosen": f"At corner {i}.", "rejected": "No idea."} for i in range(6)]
    write_jsonl(tmp_path / "src/train.jsonl", rows)
    write_jsonl(tmp_path / "src/test.jsonl", [{"prompt": "Where is cafe 0?", "chosen": "At corner 0.",
                                               "rejected": "No idea."},
                                              {"prompt": "Where is cafe 1?", "chosen": "No idea.",
                                               "rejected": "At corner 1."}, {**rows[0], "prompt": "Elsewhere?"}])
    res = run_steps(tiny_params(f"download.source={tmp_path / 'src'}"), tmp_path, "download", "tokenize", "filter")
    assert res["download"].test_in_train == 0
    assert read_json(tmp_path / "data/filtered/manifest.json")["test_pairs_in_train"] == 2
    assert "warning: 2 of the 3 test pairs have the token ids of a train pair" in res["filter"].summary()


# Mistral v0.3's shape: the system turn is written into the last user turn only while that turn ends the
# conversation (the prompt rendered alone), never before an answer.
SYSTEM_LAST = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
               "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
               "{% for m in turns %}{% if m['role'] == 'user' %}<|user|>{% if loop.last and system is defined %}"
               "{{ system }} {% endif %}{{ m['content'] }}{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
               "{% endif %}{% endfor %}")


def test_a_template_that_drops_the_system_turn_before_an_answer_says_so_and_counts_the_prompt_the_sides_hold(
        tmp_path, tiny_decoder):
    """The prompt length was the prompt rendered alone, with a system turn no side holds: every pair was
    dropped as prompt_too_long (or cut to its prompt under truncate) and the system turn went without a
    word. The length is the tokens the sides begin with as the prompt, and tokenize counts such pairs."""
    import shutil

    from rm_lib.evaluation.scoring import RewardScorer
    from rm_lib.model.modeling import load_reward_model, save_model

    folder = tmp_path / "system-last"
    shutil.copytree(tiny_decoder, folder)
    tok = load_tokenizer(str(folder))
    tok.chat_template = SYSTEM_LAST
    tok.save_pretrained(folder)
    pair = {**PAIR, "prompt": [{"role": "system", "content": "a b c d e f"}, *PAIR["prompt"]]}
    row, = tokenization.tokenize_batch([pair], tok, "tokenizer", tokenization.special_tokens(tok))
    assert tok.convert_ids_to_tokens(row["input_ids_chosen"][:row["prompt_length"]]) == [
        "<s>", "<|user|>", "how", "are", "you", "<|assistant|>"]  # what begins the answer, as a generation prompt
    assert row["prompt_left_out"]
    assert length_filter.apply([row], max_len=20, max_prompt=8, policy="drop", keep_front=1).kept
    save_model(load_reward_model(str(folder), pad_token_id=tok.pad_token_id), tok, tmp_path / "rm",
               chat_template=True)
    assert RewardScorer(tmp_path / "rm", template="tokenizer").prompt_length(pair["prompt"]) == row["prompt_length"]
    plain, = tokenization.tokenize_batch([PAIR], tok, "tokenizer", tokenization.special_tokens(tok))
    assert "prompt_left_out" not in plain
    # the step says so, and the manifest counts them per split
    rows = [{"prompt": [{"role": "system", "content": "a b c"}, {"role": "user", "content": f"how are you {i}"}],
             "chosen": [{"role": "assistant", "content": "fine thanks"}],
             "rejected": [{"role": "assistant", "content": "a b"}]} for i in range(10)]
    write_jsonl(tmp_path / "src/pairs.jsonl", rows)
    res = run_steps(tiny_params(f"download.source={tmp_path / 'src'}", "download.test_fraction=0.2",
                                "tokenize.template=tokenizer", model=str(folder)), tmp_path / "p", "download",
                    "tokenize", "filter")
    left = read_json(tmp_path / "p/data/tokenized/manifest.json")["prompts_left_out"]
    assert left == {"train": res["tokenize"].rows["train"], "test": res["tokenize"].rows["test"]} and left["test"]
    assert ("warning: the chat template leaves the text of a system or user turn out of 10 pair(s) "
            f"({left['train']} train, {left['test']} test)") in res["tokenize"].summary()
    assert "tokenize.template=chatml or simple_chat" in res["tokenize"].summary()


def test_a_template_that_writes_the_date_renders_every_text_as_on_one_day(tiny_decoder, monkeypatch, tmp_path):
    """Llama 3.2's template writes "Today Date" from the clock: tokenize gave other ids each day, and a
    model scored on another day read other texts than it trained on. Only rm_lib's renders see that day:
    a policy's prompts rendered meanwhile in another thread read the clock."""
    import datetime
    import threading

    from rm_lib.data import templates as module

    tok = load_tokenizer(str(tiny_decoder))
    tok.chat_template = ("{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}"
                         "{% endif %}{{ date_string }}" + tok.chat_template)
    assert templates.reads_clock(tok) and not templates.reads_clock(load_tokenizer(str(tiny_decoder)))
    texts, elsewhere = set(), []
    chat = PAIR["prompt"] + PAIR["chosen"]
    for day in (datetime.datetime(2026, 12, 7), datetime.datetime(2027, 1, 15)):
        monkeypatch.setattr(module, "datetime", type("Clock", (datetime.datetime,), {
            "now": classmethod(lambda cls, tz=None, day=day: day)}))
        texts.add(templates.render(chat, "tokenizer", tok))
        with module._template_day():  # this thread renders; another renders on its own
            thread = threading.Thread(target=lambda: elsewhere.append(tok.apply_chat_template(chat, tokenize=False)))
            thread.start()
            thread.join()
        assert elsewhere[-1].startswith(day.strftime("%d %b %Y"))
        assert tok.apply_chat_template(chat, tokenize=False).startswith(day.strftime("%d %b %Y"))
    assert texts == {"26 Jul 2024<s><|user|>how are you\n<|assistant|>fine thanks\n"}
    # the card's example renders as training did
    from rm_lib.publish import model_card

    tok.save_pretrained(tmp_path)
    (tmp_path / "rm_lib.json").write_text(json.dumps({"template": "tokenizer"}))
    facts = model_card.tokenizer_facts(tmp_path)
    example = model_card._example_inputs(facts)
    assert 'apply_chat_template(messages, tokenize=True, return_dict=True, date_string="26 Jul 2024")' in example
    assert "training rendered every text as on 26 Jul 2024,\nand `apply_chat_template(..., date_string=" in \
        model_card._text_rules(facts)
    # saved as train saves it (the template ends a conversation with the EOS): TRL given the model's name
    # renders today's date, which the card says
    from rm_lib.data.tokenization import template_as_trained

    dated = load_tokenizer(str(tiny_decoder))
    day_after_bos = "{{ bos_token }}{{ strftime_now('%d %b %Y') }}"
    dated.chat_template = dated.chat_template.replace("{{ bos_token }}", day_after_bos)
    template_as_trained(dated).save_pretrained(tmp_path)
    facts = model_card.tokenizer_facts(tmp_path)
    assert (facts["chat_start"], facts["chat_end"], facts["reads_clock"]) == ([], False, True)
    assert "so on any other day they read text training did not" in model_card._by_name("me/rm", facts)
    # Mistral Small 3's shape reads the clock and takes no date: the card says so, and adds no date_string
    tok.chat_template = "{{ strftime_now('%Y-%m-%d') }}" + load_tokenizer(str(tiny_decoder)).chat_template
    tok.save_pretrained(tmp_path)
    facts = model_card.tokenizer_facts(tmp_path)
    assert facts["reads_clock"] and not facts["takes_date"] and "date_string" not in model_card._example_inputs(facts)
    assert "it takes no date to render another" in model_card._text_rules(facts)
    # a tokenizer with named templates: the default one is what apply_chat_template renders with
    tok.chat_template = {"default": load_tokenizer(str(tiny_decoder)).chat_template,
                         "tool_use": "{{ strftime_now('%Y') }}"}
    assert not templates.reads_clock(tok)


def test_the_closing_of_an_answer_is_what_each_template_writes_after_it(tiny_decoder):
    """What RewardScorer.reward_function adds to a text completion: chatml's end of turn, nothing for the
    named plain templates, the tokenizer template's own (this one writes a newline), and nothing where the
    template refuses a lone exchange."""
    tok = load_tokenizer(str(tiny_decoder))
    assert templates.turn_closing("chatml", tok) == "<|im_end|>\n"
    assert templates.turn_closing("simple_chat", tok) == templates.turn_closing("simple_concat", tok) == ""
    assert templates.turn_closing("tokenizer", tok) == "\n"

    class Refusing:
        chat_template = "{{ raise_exception('a system turn first') }}"

        def apply_chat_template(self, *args, **kwargs):
            raise ValueError("a system turn first")

    assert templates.turn_closing("tokenizer", Refusing()) == ""


@pytest.mark.integration  # two whole pipelines
def test_training_on_from_a_trained_model_renders_with_its_template_and_names_it_as_the_base(tmp_path, tiny_decoder):
    """A model trained with rm_lib's chatml over a tokenizer with a chat template of its own was released
    with that template, which training never used: whoever applied it rendered other conversations, and
    training on from the release (template auto) took it, with no word, and other token ids. The release
    carries no template training did not use, and `auto` takes the one its rm_lib.json records. The new
    model's record and card name the earlier one (its card said only "a local folder")."""
    from transformers import AutoTokenizer

    first = tiny_params("train.max_steps=1", "tokenize.template=chatml", model=str(tiny_decoder))
    run_steps(first, tmp_path / "first", "download", "tokenize", "filter", "train")
    released = tmp_path / "first/models/reward_model"
    assert read_json(released / "rm_lib.json")["template"] == "chatml"
    assert AutoTokenizer.from_pretrained(tiny_decoder).chat_template  # the base has one ...
    assert not AutoTokenizer.from_pretrained(released).chat_template  # ... which training did not use
    on = tiny_params("train.max_steps=1", model=str(released))  # tokenize.template: auto
    result = run_steps(on, tmp_path / "on", "download", "tokenize")["tokenize"]
    assert result.template == "chatml"
    for split in ("train", "test"):
        ids = [r["input_ids_chosen"] for r in read_rows(tmp_path / f"first/data/tokenized/{split}.parquet")]
        assert [r["input_ids_chosen"] for r in read_rows(tmp_path / f"on/data/tokenized/{split}.parquet")] == ids
    run_steps(on, tmp_path / "on", "filter", "train", "evaluate", "push")
    earlier = read_json(released / "rm_lib.json")
    assert read_json(tmp_path / "on/models/reward_model/rm_lib.json")["base_reward_model"] == {
        "base_model": str(tiny_decoder), "data_hash": earlier["data_hash"], "content_hash": earlier["content_hash"],
        "fingerprint": earlier["fingerprint"]}
    card = (tmp_path / "on/data/release/README.md").read_text()
    assert (f", itself a reward model this project trained from `{tiny_decoder}` (weights "
            f"`{earlier['content_hash'][:16]}`, training data `{earlier['data_hash'][:16]}`") in card


@pytest.mark.parametrize("num_proc", [1, 2])
def test_tokenize_says_how_far_it_is_now_and_then(tmp_path, monkeypatch, capsys, num_proc):
    """200k pairs tokenized for six minutes without a line: one now and then says how many are done
    (and filter, a minute, says how many it has read)."""
    from rm_lib import progress
    from rm_lib.data import tokenstore

    params = tiny_params("download.demo_pairs=40", "tokenize.batch_size=8", f"tokenize.num_proc={num_proc}")
    run_steps(params, tmp_path, "download")
    clock = iter(range(0, 100_000, 20))  # each look at the clock: 20 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    counts = run_steps(params, tmp_path, "tokenize")["tokenize"].rows
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tokenize train")]
    # the clock is the process's: a pool of workers looks at it too, so which batch speaks varies
    form = r"tokenize train: (\d+) of (\d+) pairs \(\d+%\), \d+ min \d\d s so far"
    said = [re.fullmatch(form, line) for line in lines]
    assert said and all(said)
    assert all(int(m[2]) == counts["train"] and 0 < int(m[1]) < counts["train"] and int(m[1]) % 8 == 0 for m in said)
    monkeypatch.setattr(tokenstore, "READ_BATCH", 8)
    run_steps(params, tmp_path, "filter")
    read = [line for line in capsys.readouterr().err.splitlines() if line.startswith("filter train")]
    assert read and all(re.fullmatch(r"filter train: \d+ pairs read, \d+ min \d\d s so far", line) for line in read)


def test_token_rows_written_in_batches_are_the_same_bytes_however_they_were_batched(tmp_path, monkeypatch):
    """tokenize and filter write a split a batch at a time (200k pairs held as Python lists took 8 GB):
    the file, and so the content hash DVC and the chain compare, is the rows' alone."""
    from rm_lib.data import tokenstore

    monkeypatch.setattr(tokenstore, "ROW_GROUP", 3)  # several row groups of a few rows
    rows = [{"id": f"f:{i}", "input_ids_chosen": [1, i, 2], "attention_mask_chosen": [1, 1, 1],
             "input_ids_rejected": [1, i + 1, 2], "attention_mask_rejected": [1, 1, 1], "prompt_digest": str(i)}
            for i in range(8)]
    assert tokenstore.write_batches(tmp_path / "one.parquet", [rows]) == 8
    assert tokenstore.write_batches(tmp_path / "many.parquet", [rows[:1], rows[1:5], [], rows[5:]]) == 8
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "many.parquet").read_bytes()
    assert [len(b) for b in tokenstore.read_batches(tmp_path / "many.parquet", size=3)] == [3, 3, 2]
    assert [r["prompt_digest"] for r in read_rows(tmp_path / "many.parquet")] == [str(i) for i in range(8)]
    assert tokenstore.write_batches(tmp_path / "empty.parquet", []) == 0 and read_rows(tmp_path / "empty.parquet") == []


def test_token_rows_read_back_hold_one_int_object_per_id_value_and_train_reads_no_masks(tmp_path):
    """train held every filtered pair as Python lists: an int object of 28 bytes for each token id above
    256 (4.3 GB for 100k pairs of 600 tokens a side). The rows read back are what Arrow's to_pylist gives,
    key for key, but their ids share one int object per value; train and evaluate leave out the masks."""
    import pyarrow.parquet as pq

    from rm_lib.data import tokenstore

    rows = [{"id": f"f:{i}", "input_ids_chosen": [1000 + i, 70_000, 3], "attention_mask_chosen": [1, 1, 1],
             "input_ids_rejected": [1000 + i, 70_000], "attention_mask_rejected": [1, 1], "prompt_length": 1,
             "margin": None if i % 2 else 0.5, "subset": None, "length_chosen": 3, "length_rejected": 2,
             "prompt_digest": str(i)} for i in range(9)]
    tokenstore.write_rows(tmp_path / "rows.parquet", rows)
    read = [row for batch in tokenstore.read_batches(tmp_path / "rows.parquet", size=4) for row in batch]
    arrow = pq.read_table(tmp_path / "rows.parquet").to_pylist()
    assert read == arrow and [list(r) for r in read] == [list(r) for r in arrow]  # values and key order
    assert all(type(t) is int for r in read for t in r["input_ids_chosen"] + r["attention_mask_rejected"])
    assert read[0]["input_ids_chosen"][1] is read[8]["input_ids_rejected"][1]  # 70000: one object
    assert read[3]["input_ids_chosen"][0] is read[3]["input_ids_rejected"][0]
    assert read[0]["input_ids_chosen"] is not read[1]["input_ids_chosen"]  # each row its own list
    ids = tokenstore.read_rows(tmp_path / "rows.parquet", columns=tokenstore.IDS_ONLY)
    assert ids == [{k: v for k, v in r.items() if not k.startswith("attention_mask_")} for r in arrow]


def test_a_write_that_fails_while_workers_tokenize_stops_them_at_once(tmp_path, monkeypatch):
    """A full disk while tokenize wrote a split left its pool of workers to the garbage collector, which
    shut it down from the pool's own thread ("cannot join current thread") whenever it ran."""
    import multiprocessing

    import pyarrow.parquet as pq

    from rm_lib.data import tokenstore

    params = tiny_params("download.demo_pairs=60", "tokenize.batch_size=4", "tokenize.num_proc=2")
    run_steps(params, tmp_path, "download")
    monkeypatch.setattr(tokenstore, "ROW_GROUP", 8)  # a write while batches are still coming
    real, writes = pq.ParquetWriter.write_table, []

    def full_disk(self, table, *args, **kwargs):
        writes.append(table.num_rows)
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        return real(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run_steps(params, tmp_path, "tokenize")
    assert multiprocessing.active_children() == []  # the workers are gone, not waiting for a collection
    assert not (tmp_path / "data/tokenized/train.parquet").exists()  # nothing half-written in place
