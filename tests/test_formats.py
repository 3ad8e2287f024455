import pytest

from rm_lib.data.formats import Normaliser, parse_hh_transcript, split_shared_prefix
from rm_lib.errors import DataError


def norm(rows, file="f.jsonl"):
    n = Normaliser(file)
    out = list(n(enumerate(rows, start=1)))
    return n.format, [r for k, r in out if k == "pair"], [r for k, r in out if k == "reject"]


def test_hh_implicit_prompt_is_shared_prefix_before_last_reply():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: Why did the chicken...",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: No."}
    fmt, pairs, rejects = norm([row])
    assert fmt == "implicit_text" and not rejects
    assert [m["content"] for m in pairs[0]["prompt"]] == ["hi", "hello", "joke?"]
    assert pairs[0]["prompt"][-1]["role"] == "user"
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "Why did the chicken..."}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "No."}]


def test_hh_transcripts_that_diverge_earlier_keep_their_later_turns():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: ok\n\nAssistant: good",
           "rejected": "\n\nHuman: hi\n\nAssistant: go away\n\nHuman: ok\n\nAssistant: bad"}
    _, pairs, rejects = norm([row])
    assert not rejects
    assert [m["content"] for m in pairs[0]["prompt"]] == ["hi"]
    assert [m["content"] for m in pairs[0]["chosen"]] == ["hello there", "ok", "good"]
    assert [m["content"] for m in pairs[0]["rejected"]] == ["go away", "ok", "bad"]


def test_explicit_text_and_margin_from_scores():
    fmt, pairs, _ = norm([{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 0.9, "score_rejected": 0.2}])
    assert fmt == "explicit_text"
    assert pairs[0]["prompt"] == [{"role": "user", "content": "p"}]
    assert pairs[0]["margin"] == pytest.approx(0.7)
    _, pairs, _ = norm([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}])
    assert pairs[0]["margin"] == 2.0
    _, pairs, _ = norm([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert pairs[0]["margin"] is None
    # one score of the two: no margin can be made, and training it without one would treat it unlike
    # the rows beside it: set aside with its reason
    _, pairs, rejects = norm([{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 0.9},
                              {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 0.9,
                               "score_rejected": 0.5}])
    assert [p["margin"] for p in pairs] == [pytest.approx(0.4)]
    assert [(r["reason"], r["detail"]) for r in rejects] == [
        ("one_score", "score_chosen is set but score_rejected is not, so the pair has no margin")]


def test_conversational_implicit_and_explicit():
    u = {"role": "user", "content": "q"}
    fmt, pairs, _ = norm([{"chosen": [u, {"role": "assistant", "content": "good"}],
                           "rejected": [u, {"role": "assistant", "content": "bad"}]}])
    assert fmt == "implicit_conversational" and pairs[0]["prompt"] == [u]
    fmt, pairs, _ = norm([{"prompt": [{"role": "human", "content": "q"}],
                           "chosen": [{"role": "gpt", "content": "good"}],
                           "rejected": [{"role": "assistant", "content": "bad"}]}])
    assert fmt == "explicit_conversational"
    assert pairs[0]["prompt"][0]["role"] == "user" and pairs[0]["chosen"][0]["role"] == "assistant"


def test_pretokenized():
    fmt, pairs, _ = norm([{"input_ids_chosen": [1, 2, 3], "attention_mask_chosen": [1, 1, 1],
                           "input_ids_rejected": [1, 2, 4], "attention_mask_rejected": [1, 1, 1]}])
    assert fmt == "pretokenized" and pairs[0]["input_ids_chosen"] == [1, 2, 3]


def test_unusable_rows_are_rejected_with_reason_not_dropped():
    rows = [{"prompt": "p", "chosen": "", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"chosen": [{"role": "wizard", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]},
            {"prompt": "p", "chosen": "ok", "rejected": "fine"}]
    _, pairs, rejects = norm(rows[:2] + rows[3:])
    assert len(pairs) == 1 and [r["reason"] for r in rejects] == ["empty_side", "identical"]
    assert rejects[0]["row"] == 1 and rejects[0]["data"] == rows[0]
    _, _, rejects = norm([rows[2]])
    assert rejects[0]["reason"] == "malformed_messages" and "wizard" in rejects[0]["detail"]


def test_unknown_format_names_file_and_row():
    with pytest.raises(DataError,
                       match=r"file data.jsonl, row 1: unknown preference format.*missing column\(s\) rejected"):
        norm([{"chosen": "a", "answer": "b"}], file="data.jsonl")


def test_wrong_type_names_the_field():
    with pytest.raises(DataError, match=r"row 2, field 'rejected'"):
        norm([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": 5}])
    with pytest.raises(DataError, match=r"row 1, field 'margin'"):
        norm([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}])
    with pytest.raises(DataError, match=r"field 'input_ids_chosen'"):
        norm([{"input_ids_chosen": ["a"], "input_ids_rejected": [1]}])


def test_a_row_of_another_format_is_an_error_not_a_guess():
    with pytest.raises(DataError, match="row 2: row is in format implicit_text"):
        norm([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}])


def test_split_shared_prefix_and_transcript_parsing():
    msgs = parse_hh_transcript("\n\nHuman: a\n\nAssistant: b")
    assert msgs == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    prompt, c, r = split_shared_prefix(msgs, msgs[:1] + [{"role": "assistant", "content": "z"}])
    assert prompt == msgs[:1] and c == msgs[1:]


def test_an_hh_pair_whose_chosen_equals_its_rejected_is_identical_not_empty():
    transcript = "\n\nHuman: hi\n\nAssistant: hello"
    _, pairs, rejects = norm([{"chosen": transcript, "rejected": transcript},
                              {"chosen": transcript, "rejected": transcript + "  "}])
    assert not pairs and [r["reason"] for r in rejects] == ["identical", "identical"]
    u = {"role": "user", "content": "q"}
    _, _, rejects = norm([{"chosen": [u], "rejected": [u]}])
    assert [r["reason"] for r in rejects] == ["identical"]


def test_a_row_mixing_a_message_list_and_a_string_names_the_field_of_the_other_type():
    u, a, b = {"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}, {"role": "assistant",
                                                                                           "content": "no"}
    good = {"chosen": [u, a], "rejected": [u, b]}
    # read as one assistant turn, the string would make a pair of another conversation: no prompt at all
    with pytest.raises(DataError, match=r"row 2, field 'rejected': expected a list of messages like the other rows"):
        norm([good, {"chosen": [u, a], "rejected": "just a string"}])
    with pytest.raises(DataError, match=r"row 1, field 'rejected': expected a list of messages"):
        norm([{"prompt": [u], "chosen": [a], "rejected": "no"}])
    with pytest.raises(DataError, match=r"row 2, field 'chosen': expected a list of messages .*, got str"):
        norm([good, {"chosen": "yes", "rejected": [u, b]}])
    with pytest.raises(DataError, match=r"row 2, field 'chosen': expected a string .*, got list"):
        norm([{"prompt": "q", "chosen": "yes", "rejected": "no"}, {"prompt": "q", "chosen": [a], "rejected": "no"}])
    _, pairs, _ = norm([{"prompt": "q", "chosen": [a], "rejected": [b]}])  # a string prompt is one user turn
    assert pairs[0]["prompt"] == [u]
