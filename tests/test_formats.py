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


def test_hh_transcripts_with_windows_line_ends_are_read_turn_by_turn():
    """A file saved on Windows: with \\r\\n the turns were not found, and a whole transcript became one
    user turn ('Human: ...' in it) with a doubled 'Assistant'."""
    lf = {"chosen": "\n\nHuman: what is up?\n\nAssistant: great",
          "rejected": "\n\nHuman: what is up?\n\nAssistant: bad"}
    crlf = {k: v.replace("\n", "\r\n") for k, v in lf.items()}
    assert norm([crlf])[1] == norm([lf])[1]
    prompt = {"prompt": "\r\n\r\nHuman: what is up?\r\n\r\nAssistant:", "chosen": " great", "rejected": " bad"}
    assert norm([prompt])[1][0]["prompt"] == [{"role": "user", "content": "what is up?"}]


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


def test_pretokenized_by_trls_later_names():
    """TRL 1.x writes its tokenized pairs as chosen_ids/rejected_ids (and read chosen_input_ids before): refused as
    an unknown format, with only the oldest names read. A row with both texts and ids is read by its ids, as
    TRL reads it."""
    for chosen, rejected in (("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids")):
        fmt, pairs, _ = norm([{chosen: [1, 2, 3], rejected: [1, 2, 4], "margin": 0.5, "chosen": "x", "rejected": "y"}])
        assert fmt == "pretokenized" and (pairs[0]["input_ids_chosen"], pairs[0]["input_ids_rejected"],
                                          pairs[0]["margin"]) == ([1, 2, 3], [1, 2, 4], 0.5)
        with pytest.raises(DataError, match=f"row 1, field '{rejected}': expected a list of integer token ids"):
            norm([{chosen: [1, 2], rejected: "1 2"}])
    with pytest.raises(DataError, match="or token ids as chosen_ids/rejected_ids"):
        norm([{"chosen_ids": [1, 2]}])


def test_pretokenized_sides_padded_to_one_length_keep_only_what_their_masks_keep():
    """TRL's tokenized layout pads each side; the pads, read as ids, would be trained on and scored as
    text, and both sides would look equally long to the length baselines."""
    fmt, pairs, _ = norm([{"input_ids_chosen": [5, 6, 7, 0, 0], "attention_mask_chosen": [1, 1, 1, 0, 0],
                           "input_ids_rejected": [0, 5, 8, 9, 4], "attention_mask_rejected": [0, 1, 1, 1, 1]}])
    assert (pairs[0]["input_ids_chosen"], pairs[0]["input_ids_rejected"]) == ([5, 6, 7], [5, 8, 9, 4])
    with pytest.raises(DataError, match=r"row 1, field 'attention_mask_rejected': 2 values for 3 token ids"):
        norm([{"input_ids_chosen": [5, 6], "input_ids_rejected": [5, 8, 9], "attention_mask_rejected": [1, 1]}])
    with pytest.raises(DataError, match=r"field 'attention_mask_chosen': expected a list of 0s and 1s"):
        norm([{"input_ids_chosen": [5, 6], "input_ids_rejected": [5, 8], "attention_mask_chosen": [1, 2]}])
    _, pairs, rejects = norm([{"input_ids_chosen": [5, 0], "attention_mask_chosen": [1, 0],
                               "input_ids_rejected": [5, 1], "attention_mask_rejected": [1, 0]}])
    assert not pairs and rejects[0]["reason"] == "identical"  # alike once their pads are gone


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


def test_an_answer_of_invisible_characters_is_an_empty_side():
    """A zero-width space, a BOM or a NUL tokenizes to nothing (or to one unknown token): the model
    would score the prompt alone; str.strip() keeps them."""
    blank = ("\u200b", "\ufeff\u2060", "\u0000", " \u3000", "\u034f\ufe0f", "\u0300")
    rows = [{"prompt": "p", "chosen": answer, "rejected": "b"} for answer in blank]
    _, pairs, rejects = norm(rows + [{"prompt": "p", "chosen": answer, "rejected": "b"} for answer in
                                     ("ok\u200b", "e\u0301", "\U0001f44d")])  # text, an accented letter, an emoji
    assert [r["reason"] for r in rejects] == ["empty_side"] * 6 and len(pairs) == 3
    # a whole HH transcript beside an empty one: an empty side, not a malformed transcript with a hint to
    # name some other column 'prompt'
    hh = "\n\nHuman: hi\n\nAssistant: yes"
    _, pairs, rejects = norm([{"id": "e2", "chosen": hh, "rejected": side} for side in ("", " \n\t", "\u200b")])
    assert not pairs and [(r["reason"], r["detail"]) for r in rejects] == [
        ("empty_side", "empty rejected response (nothing but spaces or invisible characters)")] * 3


def test_an_answer_that_does_not_end_with_the_assistants_reply_is_set_aside():
    """The reward is read after the last token: an answer that ends with a user turn (or is one) would be
    scored on the user's words."""
    u, a = ({"role": "user", "content": "great film"}, {"role": "assistant", "content": "agreed"})
    rows = [{"prompt": [u], "chosen": [u | {"content": "what?"}], "rejected": [a]},
            {"prompt": [u], "chosen": [a], "rejected": [a | {"content": "no"}, u | {"content": "thanks"}]},
            {"prompt": [u], "chosen": [a | {"content": "well"}, a], "rejected": [a | {"content": "no"}]}]
    _, pairs, rejects = norm(rows)
    _, _, implicit = norm([{"chosen": [u, a, u], "rejected": [u, a | {"content": "no"}]}])
    rejects += [r | {"row": 3} for r in implicit]
    assert [(r["row"], r["reason"]) for r in rejects] == [(1, "answer_not_assistant"), (2, "answer_not_assistant"),
                                                          (3, "answer_not_assistant")]
    assert "rejected ends with a user turn" in rejects[1]["detail"]
    assert len(pairs) == 1  # two assistant turns in a row: still the assistant's reply


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


def test_a_prompt_the_answers_repeat_is_kept_once():
    """HuggingFaceH4/ultrafeedback_binarized: a string prompt, and chosen/rejected that are the whole
    conversation, its user turn included. Read as given, every pair would show the question twice."""
    u, a, b = {"role": "user", "content": "capital of France?"}, {"role": "assistant", "content": "Paris"}, {
        "role": "assistant", "content": "Rome"}
    s = {"role": "system", "content": "be brief"}
    _, pairs, rejects = norm([{"prompt": "capital of France?", "chosen": [u, a], "rejected": [u, b],
                               "score_chosen": 8.0, "score_rejected": 3.0},
                              {"prompt": [u], "chosen": [s, u, a], "rejected": [s, u, b]},  # the system turn too
                              {"prompt": "capital of France?", "chosen": [u, a], "rejected": [b]}])
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [([u], [a], [b]), ([s, u], [a], [b])]
    assert pairs[0]["margin"] == 5.0
    assert [(r["reason"], r["detail"]) for r in rejects] == [
        ("prompt_repeated", "chosen starts with the prompt's turns and rejected does not")]


def test_a_repeated_prompt_is_cut_whatever_its_spaces_and_a_shared_later_turn_is_no_prompt():
    u, a, b = {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}, {
        "role": "assistant", "content": "5"}
    spaced = {**u, "content": "What is 2+2? "}
    _, pairs, _ = norm([{"prompt": [u], "chosen": [u, a], "rejected": [spaced, b]}])
    assert (pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"]) == ([u], [a], [b])
    # the answers share turns that end with a copy of the prompt: the prompt is not the shared turns
    go_on, first = {"role": "user", "content": "Continue"}, {"role": "assistant", "content": "Once upon a time"}
    _, pairs, _ = norm([{"prompt": [go_on], "chosen": [first, go_on, a], "rejected": [first, go_on, b]}])
    assert pairs[0]["prompt"] == [go_on] and pairs[0]["chosen"] == [first, go_on, a]


def test_an_hh_prompt_is_read_by_turns_only_where_the_reply_follows_it():
    _, pairs, _ = norm([{"prompt": "Human: Hi\n\nAssistant: Hello\n\nHuman: How are you?", "chosen": "Fine",
                         "rejected": "Bad"}])
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Human: Hi\n\nAssistant: Hello\n\nHuman: How are you?"}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "Fine"}]


def test_a_blank_system_column_is_none_and_one_unlike_the_prompts_sets_the_pair_aside():
    s = {"role": "system", "content": "be brief"}
    _, pairs, rejects = norm([{"system": "  ", "prompt": "q", "chosen": "a", "rejected": "b"},
                              {"system": "be long", "prompt": [s, {"role": "user", "content": "q"}], "chosen": "a",
                               "rejected": "b"}])
    assert pairs[0]["prompt"] == [{"role": "user", "content": "q"}]
    assert [r["reason"] for r in rejects] == ["system_mismatch"]
    # HuggingFaceH4/orca_dpo_pairs: a blank system turn inside the message lists is none as well (it was
    # kept, an empty system block that the same data with a system column did not get)
    blank, u = {"role": "system", "content": ""}, {"role": "user", "content": "q"}
    _, pairs, _ = norm([{"prompt": "q", "chosen": [blank, u, {"role": "assistant", "content": "a"}],
                         "rejected": [blank, u, {"role": "assistant", "content": "b"}]}])
    assert pairs[0]["prompt"] == [u] and pairs[0]["chosen"] == [{"role": "assistant", "content": "a"}]


def test_scores_that_tie_or_prefer_the_rejected_side_set_the_pair_aside():
    """A margin of 0 or below from the pair's own scores is no preference for chosen: trained on, a tie
    pulls the rewards apart for nothing, a negative margin against its label."""
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 6.0, "score_rejected": 6.0},
            {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 2.0, "score_rejected": 9.0},
            {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 9.0, "score_rejected": 2.0}]
    _, pairs, rejects = norm(rows)
    assert [p["margin"] for p in pairs] == [7.0]
    assert [r["reason"] for r in rejects] == ["tied_scores", "scores_against_label"]
    assert rejects[1]["detail"] == "score_chosen 2 is below score_rejected 9: the scores prefer the rejected side"
    # a margin column beside the scores (margin = score_chosen - score_rejected, or a margin of its own) is the
    # margin trained with; it no longer hides scores that tie or favour rejected
    with_margin = [{**row, "margin": m} for row, m in zip(rows, (0.0, 1.0, 0.5))]
    _, pairs, rejects = norm(with_margin)
    assert [p["margin"] for p in pairs] == [0.5]
    assert [r["reason"] for r in rejects] == ["tied_scores", "scores_against_label"]


def test_a_tool_call_or_messages_written_as_text_set_the_pair_aside_with_their_reason():
    u = {"role": "user", "content": "weather?"}
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather"}}]}
    _, pairs, rejects = norm([{"chosen": [u, call, {"role": "assistant", "content": "sunny"}],
                               "rejected": [u, {"role": "assistant", "content": "no idea"}]}])
    assert not pairs and rejects[0]["reason"] == "tool_calls"
    # what pandas' or datasets' to_csv writes for a message list: its repr, which is not JSON
    _, pairs, rejects = norm([{"prompt": "q", "chosen": "[{'role': 'user', 'content': 'q'}\n {'role': 'assistant', "
                                                        "'content': 'yes'}]", "rejected": "no"}], file="data.csv")
    assert not pairs and rejects[0]["reason"] == "messages_as_text"
    assert "chosen holds a list of messages written as text" in rejects[0]["detail"]
    # an OpenAI-style call carries no content; and an answer that opens with such a list is an answer
    call = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}
    _, _, rejects = norm([{"prompt": "q", "chosen": [call], "rejected": [{"role": "assistant", "content": "b"}]}])
    assert [r["reason"] for r in rejects] == ["tool_calls"]
    answer = '[{"role": "admin", "id": 1}] is the JSON you need'
    _, pairs, _ = norm([{"prompt": "q", "chosen": answer, "rejected": "no"}])
    assert len(pairs) == 1


def test_lists_of_answers_are_no_pair_whether_written_as_lists_or_as_text():
    """RewardBench 2's best-of-N rows (chosen: [answer], rejected: [answer, ...]) read as a pair scored each
    list as one text (its JSON or repr), or set every row aside as malformed messages."""
    from rm_lib.data.formats import answers_as_text

    rb2 = {"prompt": "q", "chosen": ["good"], "rejected": ["bad", "worse"]}
    for row, message in [(rb2, "are lists of answers"),
                         ({**rb2, "chosen": '["good"]', "rejected": '["bad", "worse"]'}, "written as text"),
                         ({**rb2, "chosen": "['good']", "rejected": "['bad' 'worse'\n 'worst']"}, "written as text")]:
        with pytest.raises(DataError, match=message) as caught:
            norm([row], file="rb2.csv")
        assert (caught.value.file, caught.value.row, caught.value.field) == ("rb2.csv", 1, "chosen")
    # numpy's repr parts items by spaces or a newline alone, where Python would join two strings into one
    assert answers_as_text("['bad' 'worse'\n 'worst']") == ["bad", "worse", "worst"]
    assert answers_as_text("[citation needed]") is answers_as_text('[{"role": "user", "content": "x"}]') is None
    # one answer that is a JSON list of words is an answer
    _, pairs, _ = norm([{"prompt": "Colours as JSON?", "chosen": '["red", "green"]', "rejected": "red, green"}])
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": '["red", "green"]'}]


def test_an_answer_in_brackets_is_read_as_prose_without_parsing_it_as_python(monkeypatch):
    """An answer such as "[Answer] ... [1]" went through the Python-repr reader, which inserted its commas
    one copy of the text at a time: a 780 KB answer held download for 51 s. Prose is no list of answers;
    a numpy repr of many answers still reads item by item."""
    from rm_lib.data import formats

    numpy_repr = "[" + "\n ".join(f"'answer {i}'" for i in range(2000)) + "]"
    assert formats.answers_as_text(numpy_repr) == [f"answer {i}" for i in range(2000)]

    def no_python(text):
        raise AssertionError("prose was parsed as Python")

    monkeypatch.setattr(formats, "_python_literal", no_python)
    answer = "[Answer] " + "the cat sat on the mat " * 50 + "[1]"
    _, pairs, _ = norm([{"prompt": "q", "chosen": answer, "rejected": "no"}])
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": answer}]


def test_an_hh_transcript_prompt_and_a_system_column_are_read_as_turns():
    """Dahoas/rm-static: the prompt is an HH transcript up to 'Assistant:'. Intel/orca_dpo_pairs: a system
    column beside the prompt. A message-list prompt beside string answers is one more reading."""
    _, pairs, _ = norm([{"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant:",
                         "chosen": " Why did the chicken...", "rejected": " No."}])
    assert [(m["role"], m["content"]) for m in pairs[0]["prompt"]] == [("user", "hi"), ("assistant", "hello"),
                                                                        ("user", "a joke?")]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "Why did the chicken..."}]
    _, pairs, _ = norm([{"system": "You are helpful.", "prompt": "q", "chosen": "a", "rejected": "b"}])
    assert pairs[0]["prompt"] == [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "q"}]
    fmt, pairs, _ = norm([{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}])
    assert fmt == "explicit_text" and pairs[0]["chosen"] == [{"role": "assistant", "content": "a"}]


def test_string_answers_without_a_prompt_column_say_how_they_are_read():
    _, _, rejects = norm([{"system": "", "question": "q", "chosen": "a", "rejected": "b"}])
    assert rejects[0]["detail"].endswith("so each is read as a whole HH-RLHF transcript: if question holds the "
                                         "prompt, name that column 'prompt'")


def test_content_given_as_text_parts_is_read_as_its_text_and_an_image_sets_the_pair_aside():
    """The multimodal message layout, which recent datasets use for text too."""
    u = {"role": "user", "content": [{"type": "text", "text": "name "}, {"type": "text", "text": "a colour"}]}
    _, pairs, _ = norm([{"chosen": [u, {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
                         "rejected": [u, {"role": "assistant", "content": "a fish"}]}])
    assert pairs[0]["prompt"] == [{"role": "user", "content": "name a colour"}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "red"}]
    image = {"role": "user", "content": [{"type": "image", "url": "cat.png"}, {"type": "text", "text": "what?"}]}
    _, pairs, rejects = norm([{"chosen": [image, {"role": "assistant", "content": "a cat"}],
                               "rejected": [image, {"role": "assistant", "content": "a dog"}]}])
    assert not pairs and rejects[0]["detail"] == "chosen[0].content is not a string, nor a list of text parts"


def test_a_prompt_column_the_whole_conversations_end_with_or_that_differs_from_them_is_not_doubled():
    """distilabel-capybara's layout: a prompt column beside chosen/rejected that hold the whole multi-turn
    conversation. Where the prompt was its last user turn, or its text differed from the list's (a final
    '.'), the pair trained on the user turn twice, once before the whole conversation."""
    u1, a1 = {"role": "user", "content": "First question"}, {"role": "assistant", "content": "First answer"}
    u2 = {"role": "user", "content": "Follow-up"}
    good, bad = {"role": "assistant", "content": "good"}, {"role": "assistant", "content": "bad"}
    _, pairs, rejects = norm([{"prompt": "Follow-up", "chosen": [u1, a1, u2, good], "rejected": [u1, a1, u2, bad]},
                              {"prompt": "First question.", "chosen": [u1, good], "rejected": [u1, bad]}])
    assert (pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"]) == ([u1, a1, u2], [good], [bad])
    assert [r["reason"] for r in rejects] == ["prompt_mismatch"]
    # answers that repeat only the prompt's last turn (not its system turn or history) lose that turn
    system = {"role": "system", "content": "be brief"}
    _, pairs, _ = norm([{"prompt": [system, u2], "chosen": [u2, good], "rejected": [u2, bad]},
                        {"prompt": [u1, a1, u2], "chosen": [u2, good], "rejected": [u2, bad]}])
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [([system, u2], [good], [bad]),
                                                                          ([u1, a1, u2], [good], [bad])]


def test_an_hh_prompt_beside_whole_transcripts_is_read_once():
    """A Dahoas-style prompt column beside answers that are whole HH transcripts (the prompt in them too)
    read as the prompt, an empty assistant turn and the prompt again."""
    prompt = "\n\nHuman: What is 1+1?\n\nAssistant:"
    _, pairs, rejects = norm([{"prompt": prompt, "chosen": prompt + " It is 2.", "rejected": prompt + " It is 3."},
                              {"prompt": prompt, "chosen": prompt + " It is 2.", "rejected": " It is 3."}])
    assert pairs[0]["prompt"] == [{"role": "user", "content": "What is 1+1?"}]
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ([{"role": "assistant", "content": "It is 2."}],
                                                          [{"role": "assistant", "content": "It is 3."}])
    assert [r["reason"] for r in rejects] == ["prompt_repeated"]
