"""Detect and normalise the preference formats users bring.

Every format becomes one normalised pair:
  {"id", "prompt": [messages], "chosen": [messages], "rejected": [messages], "margin": float | None}
or, for pretokenized input, {"id", "input_ids_chosen", "input_ids_rejected", "margin"}.
Structural problems (unknown format, missing columns, wrong types) raise DataError naming file,
row and field. Rows that are well-formed but unusable (an empty side, chosen == rejected,
malformed messages) are returned as rejects with a reason, never dropped silently.
"""
from __future__ import annotations

import ast
import io
import json
import math
import re
import tokenize
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from rm_lib.errors import DataError

FORMATS = ("implicit_text", "explicit_text", "implicit_conversational", "explicit_conversational",
           "pretokenized")
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "bot": "assistant", "model": "assistant", "system": "system"}
# Columns some format reads; any other column is ignored, and counted so the user sees it.
# The columns of token ids, by TRL's names: its tokenized layout before 0.12 (with attention masks), TRL 1.x's
# (chosen_ids) and the one between, which TRL 1.x still reads
ID_COLUMNS = (("input_ids_chosen", "input_ids_rejected"), ("chosen_ids", "rejected_ids"),
              ("chosen_input_ids", "rejected_input_ids"))
USED_COLUMNS = frozenset({"prompt", "chosen", "rejected", *(c for pair in ID_COLUMNS for c in pair),
                          "attention_mask_chosen", "attention_mask_rejected", "margin", "score_chosen",
                          "score_rejected", "subset", "system"})
# Keys some format reads in a row or a message (and the ids and categories suites and score read). json
# keeps the last of two equal keys in an object: a row with `chosen` twice trained on the second one
# without a word. A key of these written twice in any object is refused, also where the object is
# metadata the reader ignores (the parser cannot tell); another is left as json reads it.
ROW_KEYS = USED_COLUMNS | {"id", "category"}  # a row's: a column named twice is refused too (sources)
READ_KEYS = ROW_KEYS | {"role", "content", "tool_calls", "function_call", "type", "text"}


class RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json's object_pairs_hook: the object, or RepeatedKey for a key of READ_KEYS written twice in it."""
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set[str] = set()
        repeated = [key for key, _ in pairs if key in seen or seen.add(key)]
        if read := next((key for key in repeated if key in READ_KEYS), None):
            raise RepeatedKey(read)
    return row


def repeated_key(key: str) -> str:
    return (f"the key {key!r} is written twice in one object, and the reader cannot know which value is meant; "
            "keep one")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def id_columns(row: dict) -> tuple[str, str] | None:
    """The row's columns of chosen and rejected token ids, of the first of TRL's names it has both of."""
    return next((pair for pair in ID_COLUMNS if pair[0] in row and pair[1] in row), None)


def detect_format(row: dict, *, file: str, row_number: int) -> str:
    """Name the format of a row from its columns and the type of its `chosen` value."""
    if not isinstance(row, dict):
        raise DataError(f"expected an object with preference columns, got {type(row).__name__}",
                        file=file, row=row_number)
    keys = set(row)
    if id_columns(row) is not None:
        return "pretokenized"
    if {"chosen", "rejected"} <= keys:
        chosen = row["chosen"]
        kind = "text" if isinstance(chosen, str) else "conversational" if isinstance(chosen, list) else None
        if kind is None:
            raise DataError(f"expected a string or a list of messages, got {type(chosen).__name__}",
                            file=file, row=row_number, field="chosen")
        return f"{'explicit' if 'prompt' in keys else 'implicit'}_{kind}"
    missing = sorted({"chosen", "rejected"} - keys)
    raise DataError(
        f"unknown preference format: missing column(s) {', '.join(missing)}; found columns "
        f"{', '.join(sorted(map(str, keys))) or '(none)'}. Expected chosen/rejected (with an optional "
        "prompt) as strings or message lists, or token ids as chosen_ids/rejected_ids (or input_ids_chosen/"
        "input_ids_rejected, chosen_input_ids/rejected_input_ids)",
        file=file, row=row_number)


class Rejected(Exception):
    """A row that is well-formed but unusable: a reason category for the counts, a detail for people."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(detail or reason)
        self.reason, self.detail = reason, detail or reason


def parse_hh_transcript(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{'role': 'user', ...}, {'role': 'assistant', ...}].
    Windows line ends (a file saved on Windows) read as \\n."""
    parts = _HH_TURN.split(text.replace("\r\n", "\n"))
    if parts[0].strip():
        raise Rejected("malformed_transcript",
                      "transcript does not start with a '\\n\\nHuman:' or '\\n\\nAssistant:' turn")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if not messages:
        raise Rejected("malformed_transcript", "no 'Human:'/'Assistant:' turns found")
    return messages


def read_messages(value: Any, side: str, *, file: str, row_number: int) -> list[dict]:
    """A prompt or an answer as training reads it: a text (one user turn for the prompt, one assistant
    turn for an answer), or a list of messages, each its role (aliases read as user, assistant, system)
    and its content (text, or text parts joined); a blank system turn is none. Rejected where a message
    cannot be read so; a DataError where `value` is neither a text nor a list."""
    if isinstance(value, str):
        return [{"role": "assistant" if side != "prompt" else "user", "content": value}]
    if not isinstance(value, list):
        raise DataError(f"expected a string or a list of messages, got {type(value).__name__}",
                        file=file, row=row_number, field=side)
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "content" not in message or "role" not in message:
            raise Rejected("malformed_messages", f"{side}[{i}] is not a {{'role', 'content'}} message")
        role = ROLE_ALIASES.get(str(message["role"]).lower())
        if role is None:
            raise Rejected("malformed_messages", f"{side}[{i}] has unknown role {message['role']!r}")
        if message.get("tool_calls") or message.get("function_call"):  # kept as text only, the call would vanish
            raise Rejected("tool_calls", f"{side}[{i}] calls a tool, and a pair's messages carry text turns only")
        content = _text_parts(message["content"])
        if content is None:
            raise Rejected("malformed_messages", f"{side}[{i}].content is not a string, nor a list of text parts")
        if role == "system" and not content.strip():  # a blank system turn is none, as a blank system column is
            continue
        out.append({"role": role, "content": content})
    return out


def _text_parts(content: Any) -> str | None:
    """A message's text: a string, or the parts of the multimodal layout when each is text
    ([{"type": "text", "text": ...}], joined as chat templates join them); None otherwise (an image)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def left_out_keys(row: dict) -> set[str]:
    """The keys of a row's messages that training leaves out, as `side[].key`, where they hold a value:
    a message is read as its role and its content (a `reasoning_content`, a `name` are not trained on).
    A tool call is not among them: it sets the row aside."""
    sides = {side: row.get(side) if isinstance(row.get(side), list) else [] for side in ("prompt", "chosen", "rejected")}
    if "prompt" not in row:  # implicit: the turns both sides begin with are the prompt, as training splits them
        shared = 0
        for a, b in zip(sides["chosen"], sides["rejected"]):
            if not (isinstance(a, dict) and isinstance(b, dict)) or \
                    (a.get("role"), a.get("content")) != (b.get("role"), b.get("content")):
                break
            shared += 1
        sides = {"prompt": sides["chosen"][:shared], "chosen": sides["chosen"][shared:],
                 "rejected": sides["rejected"][shared:]}
    keys = set()
    for side, messages in sides.items():
        for message in messages:
            if isinstance(message, dict):
                keys.update(f"{side}[].{k}" for k, v in message.items()
                            if k not in _READ_KEYS and v not in (None, "", [], {}))
    return keys


_READ_KEYS = ("role", "content", "tool_calls", "function_call")


def scoring_item(item: Any, name: str, *, any_role: bool = False) -> str | list[dict]:
    """One item a scorer is given: a text, or a conversation (a list of messages, each a dict with a
    str `role`). Anything else is a DataError naming the item, where it would be scored as something
    else. `any_role`: the tokenizer's chat template renders the messages, those training reads as
    training gave them, any other (a tool call, a `tool` or `developer` turn) with whatever keys the
    template reads (_template_messages); otherwise rm_lib's templates do, which
    print user, assistant and system turns (and their aliases) of text only. Either way a message's
    content is read as training reads it: text, or text parts joined; none, or another kind, is an
    error, except beside a tool call, whose content may be None."""
    if isinstance(item, str):
        texts = [item]
    elif isinstance(item, list):
        if not item:
            raise DataError(f"{name}: an empty conversation, which holds nothing to score")
        for i, message in enumerate(item):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise DataError(f"{name}: conversation[{i}] is not a message (a dict with a str 'role')")
        if not any_role:
            try:
                item = read_messages(item, "conversation", file=name, row_number=0)
            except Rejected as exc:
                raise DataError(f"{name}: {exc.detail} (rm_lib's templates print user, assistant and system "
                                "turns of text; a model trained with its tokenizer's chat template renders any)"
                                ) from None
        else:
            item = [m for i, message in enumerate(item)
                    for m in _template_messages(message, f"{name}: conversation[{i}]")]
        if not item:
            raise DataError(f"{name}: a conversation of blank system turns, which holds nothing to score")
        texts = [m["content"] for m in item if isinstance(m.get("content"), str)]
    else:
        raise DataError(f"{name}: a text (str) or a conversation (a list of {{'role', 'content'}} messages), "
                        f"got {type(item).__name__}")
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"{name}: holds a lone surrogate (\\u{ord(text[exc.start]):04x}), which is not valid "
                            "Unicode text") from None
    return item


def _template_messages(message: dict, where: str) -> list[dict]:
    """A message for the tokenizer's chat template, as a list of none or one. One that training reads (a
    user, assistant or system turn of text) is given as training gave it to the template: its role and
    content, a blank system turn none (the template may print its default system prompt then, as it did
    in training), other keys (a `reasoning_content`) left out. Any other (a tool call, a `tool` or
    `developer` turn) with its keys as given: without this a template prints a list of text parts as its
    Python repr, and a missing or None content as an empty turn."""
    try:
        return read_messages([message], "conversation", file=where, row_number=0)
    except Rejected:
        pass
    role = ROLE_ALIASES.get(message["role"].lower())
    message = {**message, "role": role} if role else message
    call = message.get("tool_calls") or message.get("function_call")
    if call and message.get("content") is None:  # an OpenAI-style call: the template renders the call
        return [message]
    if "content" not in message:
        raise DataError(f"{where} is not a {{'role', 'content'}} message")
    content = _text_parts(message["content"])
    if content is None:
        raise DataError(f"{where}.content is not a string, nor a list of text parts")
    return [{**message, "content": content}]


def split_shared_prefix(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Implicit prompt: the longest run of identical leading messages. Where the two transcripts
    diverge before the last reply, the later turns stay part of each response."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _finite(value: Any, key: str, *, file: str, row_number: int) -> float:
    """JSON NaN/Infinity, Parquet NaN and an integer past float's range (JSON has no limit) would
    poison the loss."""
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        shown = (f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits, past a float's range "
                 "(1.8e308)" if isinstance(value, int) else repr(value))
        raise DataError(f"expected a finite number, got {shown}", file=file, row=row_number, field=key)
    return number


def _margin(row: dict, *, file: str, row_number: int) -> float | None:
    numbers = {}
    for key in ("margin", "score_chosen", "score_rejected"):
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DataError(f"expected a number, got {value!r}", file=file, row=row_number, field=key)
        if value is not None:
            numbers[key] = _finite(value, key, file=file, row_number=row_number)
    if "margin" in numbers and not ("score_chosen" in numbers and "score_rejected" in numbers):
        return numbers["margin"]
    if "score_chosen" in numbers and "score_rejected" in numbers:
        margin = numbers["score_chosen"] - numbers["score_rejected"]
        if not math.isfinite(margin):  # two finite scores near float's limit, of opposite signs
            raise DataError(f"score_chosen - score_rejected is not a finite number ({margin})",
                            file=file, row=row_number, field="score_chosen")
        # the scores are the label's evidence: equal ones prefer neither side (UltraFeedback's binarized
        # sets hold such pairs), and lower ones for chosen contradict it
        if margin == 0:
            raise Rejected("tied_scores", f"score_chosen equals score_rejected ({numbers['score_chosen']:g}): "
                                         "the pair prefers neither side")
        if margin < 0:
            raise Rejected("scores_against_label",
                          f"score_chosen {numbers['score_chosen']:g} is below score_rejected "
                          f"{numbers['score_rejected']:g}: the scores prefer the rejected side")
        return numbers.get("margin", margin)  # a margin column beside the scores is the one to train with
    one = [k for k in ("score_chosen", "score_rejected") if row.get(k) is not None]
    if one:  # its margin cannot be known: trained without one, it would count unlike the rows beside it
        other = "score_rejected" if one[0] == "score_chosen" else "score_chosen"
        raise Rejected("one_score", f"{one[0]} is set but {other} is not, so the pair has no margin")
    return None


def _token_ids(value: Any, key: str, *, file: str, row_number: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError("expected a list of integer token ids", file=file, row=row_number, field=key)
    return value


# controls, format marks (zero-width, BOM), spaces, and marks that combine with nothing here (U+0300, U+FE0F)
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me"})


def is_blank(text: str) -> bool:
    """No visible character: a zero-width space, a BOM, a NUL or a lone combining mark is an answer of
    nothing, which the model scores as the prompt alone (str.strip() keeps them)."""
    return all(unicodedata.category(ch) in _INVISIBLE for ch in text)


def _unmasked(ids: list[int], mask: Any, key: str, *, file: str, row_number: int) -> list[int]:
    """The ids a pretokenized side's attention mask keeps (TRL's tokenized layout pads each side): its
    pad tokens, read as text, would be trained on and scored, and every side as long as the longest."""
    if mask is None:
        return ids
    if not isinstance(mask, list) or not all(v in (0, 1) and not isinstance(v, float) for v in mask):
        raise DataError("expected a list of 0s and 1s (the attention mask)", file=file, row=row_number, field=key)
    if len(mask) != len(ids):
        raise DataError(f"{len(mask)} values for {len(ids)} token ids in input_ids_{key.rsplit('_', 1)[-1]}",
                        file=file, row=row_number, field=key)
    return [i for i, keep in zip(ids, mask) if keep]


def _check_unicode(value: Any, key: str, *, file: str, row_number: int) -> None:
    """JSON may escape a lone surrogate (\\ud800), which no UTF-8 text holds: the tokenizer, and every
    file written after download, would fail on it far from its row."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"holds a lone surrogate (\\u{ord(value[exc.start]):04x} at character {exc.start}), which "
                            "is not valid Unicode text", file=file, row=row_number, field=key) from None
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item, key, file=file, row_number=row_number)
    elif isinstance(value, dict):
        for item in value.values():
            _check_unicode(item, key, file=file, row_number=row_number)


def pair_source(pair_id: str) -> tuple[str, int | None]:
    """(file, row) of the source row a normalised pair's id names (`file:row`, as normalise_row makes it)."""
    file, _, row = pair_id.rpartition(":")
    return (file, int(row)) if file and row.isdigit() else (pair_id, None)


def normalise_row(row: dict, fmt: str, *, file: str, row_number: int) -> dict:
    """One source row -> one normalised pair. Raises DataError (bad structure) or Rejected."""
    pair_id = f"{file}:{row_number}"
    for key in ("prompt", "chosen", "rejected", "subset", "system"):
        _check_unicode(row.get(key), key, file=file, row_number=row_number)
    margin = _margin(row, file=file, row_number=row_number)
    # an optional category (RewardBench's `subset`): evaluate reports accuracy per subset
    subset = {"subset": str(row["subset"])} if row.get("subset") not in (None, "") else {}
    if fmt == "pretokenized":
        columns = id_columns(row) or ID_COLUMNS[0]  # a row without them: the error names the first layout's
        chosen, rejected = (_unmasked(_token_ids(row.get(column), column, file=file, row_number=row_number),
                                      row.get(f"attention_mask_{side}"), f"attention_mask_{side}", file=file,
                                      row_number=row_number) for side, column in zip(("chosen", "rejected"), columns))
        if not chosen or not rejected:
            raise Rejected("empty_side")
        if chosen == rejected:
            raise Rejected("identical", "chosen is identical to rejected")
        return {"id": pair_id, "input_ids_chosen": chosen, "input_ids_rejected": rejected, "margin": margin,
                **subset}
    for key in ("chosen", "rejected"):  # a prompt may be a message list beside string answers: one reading
        if fmt.endswith("text") and not isinstance(row[key], str):
            raise DataError(f"expected a string like the other rows of this file, got {type(row[key]).__name__}",
                            file=file, row=row_number, field=key)
    # A string answer beside a message list would be read as one assistant turn, and the shared prefix
    # as the prompt would vanish: a pair of another conversation. (A string prompt is one user turn.)
    for key in ("chosen", "rejected"):
        if fmt.endswith("conversational") and not isinstance(row[key], list):
            raise DataError(f"expected a list of messages like the other rows of this file, got "
                            f"{type(row[key]).__name__}", file=file, row=row_number, field=key)
    for key in ("prompt", "chosen", "rejected"):
        if isinstance(row.get(key), str) and messages_as_text(row[key]):
            raise Rejected("messages_as_text", f"{key} holds a list of messages written as text (Python's repr, or JSON "
                                              "inside a string), which would be trained on as words; write the "
                                              "messages as a list (Dataset.to_json or to_parquet; in a CSV file, "
                                              "each cell as JSON)")
    _refuse_answer_lists(row, file=file, row_number=row_number)
    if fmt == "explicit_text" and isinstance(row["prompt"], str) and _is_hh_prompt(row["prompt"]):
        fmt = "implicit_text"  # Dahoas/rm-static: an HH transcript up to 'Assistant:', the answers after it
        head = "\n\n" + row["prompt"].replace("\r\n", "\n").lstrip()
        whole = [row[k].replace("\r\n", "\n").lstrip().startswith(head.lstrip()) for k in ("chosen", "rejected")]
        if any(whole) and not all(whole):
            repeats, other = ("chosen", "rejected") if whole[0] else ("rejected", "chosen")
            raise Rejected("prompt_repeated", f"{repeats} starts with the prompt's transcript and {other} does not")
        if not all(whole):  # the answers alone; whole transcripts (the prompt in them too) are read as they are
            row = {**row, "chosen": head + row["chosen"], "rejected": head + row["rejected"]}
    if fmt in ("implicit_text", "implicit_conversational"):
        if fmt == "implicit_text":
            whole = _transcript(row, "chosen"), _transcript(row, "rejected")
        else:
            whole = (read_messages(row["chosen"], "chosen", file=file, row_number=row_number),
                     read_messages(row["rejected"], "rejected", file=file, row_number=row_number))
        if whole[0] == whole[1]:  # else the shared prefix would swallow both and call the sides empty
            raise Rejected("identical", _identical(row))
        prompt, chosen, rejected = split_shared_prefix(*whole)
    else:
        prompt = read_messages(row["prompt"], "prompt", file=file, row_number=row_number)
        chosen = read_messages(row["chosen"], "chosen", file=file, row_number=row_number)
        rejected = read_messages(row["rejected"], "rejected", file=file, row_number=row_number)
        prompt, chosen, rejected = _without_repeated_prompt(prompt, chosen, rejected)
    prompt = _with_system(row.get("system"), prompt, file=file, row_number=row_number)
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or all(is_blank(m["content"]) for m in messages):
            raise Rejected("empty_side", f"empty {side} response (nothing but spaces or invisible characters)")
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":  # the reward is read at the end: after that turn, not a reply
            raise Rejected("answer_not_assistant", f"{side} ends with a {messages[-1]['role']} turn, not the "
                                                  "assistant's reply the reward is read after")
    if chosen == rejected:
        raise Rejected("identical", _identical(row))
    return {"id": pair_id, "prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin, **subset}


def _identical(row: dict) -> str:
    """Why a pair whose sides read the same is identical, naming the keys training left out of its
    messages where the sides differ only there."""
    keys: set[str] = set()
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        for a, b in zip(chosen, rejected):
            if isinstance(a, dict) and isinstance(b, dict):
                keys.update(str(k) for k in a.keys() | b.keys() if k not in _READ_KEYS and a.get(k) != b.get(k))
    if not keys:
        return "chosen is identical to rejected"
    return (f"chosen is identical to rejected once their messages are read as training reads them, a role and a "
            f"content each ({', '.join(sorted(keys))} left out)")


_MESSAGES_AS_TEXT = re.compile(r"""\s*\[\s*\{\s*['"](role|content)['"]\s*:""")


def messages_as_text(text: str) -> bool:
    """A message list's JSON or Python repr (what pandas' to_csv writes), not an answer that opens with one."""
    if not _MESSAGES_AS_TEXT.match(text):
        return False
    import ast

    # numpy's repr of an array of dicts (pandas writes it) parts them by a newline alone
    listed = re.sub(r"\}\s+\{", "}, {", text)
    for parse in (json.loads, ast.literal_eval):  # which value a repeated key holds matters not: it is set aside
        try:
            value = parse(listed)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        return isinstance(value, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value)
    return False


# A list of answers opens with a text (a quote, after Python's string prefixes), a message list or `]`:
# prose in brackets ("[Answer] ...") is no list, and reading it as Python would cost seconds.
_LIST_OPENING = re.compile(r"\[\s*(?:[\[\]{]|[rRuU]?[\"'])")


def answers_as_text(text: str, *, unique: bool = False) -> list | None:
    """The list of answers a text holds when it is such a list written out whole, as a best-of-N row's
    `chosen` or `rejected` (RewardBench 2) is in a CSV file: JSON, Python's repr, or numpy's (what pandas'
    to_csv writes for a column read from Parquet). Each answer is a text or a message list; None for any
    other text, a message list among them. `unique`: a key some format reads written twice in it is
    RepeatedKey (for a reader that names the file and row: a CSV cell)."""
    stripped = text.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")) or not _LIST_OPENING.match(stripped):
        return None
    for parse in (_json_unique if unique else json.loads, _python_literal):
        try:
            value = parse(stripped)
        except RepeatedKey:
            raise
        except (ValueError, SyntaxError, MemoryError, RecursionError, tokenize.TokenError):
            continue
        if is_answer_list(value):
            return value
    return None


def _json_unique(text: str) -> Any:
    return json.loads(text, object_pairs_hook=unique_keys)


def is_answer_list(value: Any) -> bool:
    """A best-of-N side: a list of texts, or a list of message lists (a list of messages is one answer)."""
    def answer(item: Any) -> bool:
        return isinstance(item, str) or (isinstance(item, list) and bool(item)
                                         and all(isinstance(m, dict) and "role" in m for m in item))

    return isinstance(value, list) and all(map(answer, value))


_SKIPPED_TOKENS = frozenset({tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT,
                             tokenize.ENDMARKER})


def _python_literal(text: str) -> Any:
    """A Python literal, where items parted by spaces or a newline alone are items of their own: numpy
    prints an array so, and Python would join two such strings into one answer."""
    def value(token: tokenize.TokenInfo, brackets: str) -> bool:
        return token.type in (tokenize.STRING, tokenize.NUMBER, tokenize.NAME) or token.string in brackets

    starts = [0]
    for line in text.split("\n"):
        starts.append(starts[-1] + len(line) + 1)
    commas, previous = [], None
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type in _SKIPPED_TOKENS:
            continue
        if previous is not None and value(previous, ")]}") and value(token, "([{"):
            commas.append(starts[token.start[0] - 1] + token.start[1])
        previous = token
    # One join: inserting comma by comma copies the text once per comma (minutes on a long answer).
    pieces = [text[start:end] for start, end in zip([0, *commas], [*commas, len(text)], strict=True)]
    return ast.literal_eval(",".join(pieces))


def _refuse_answer_lists(row: dict, *, file: str, row_number: int) -> None:
    """A row whose chosen and rejected are lists of answers is RewardBench 2's best-of-N layout, no pair:
    written as text, each list would be scored as one answer of that text; as lists, each set aside as
    malformed messages. Both sides, since one answer may well be a JSON list of words."""
    sides = [row[key] if isinstance(row[key], list) else answers_as_text(row[key]) if isinstance(row[key], str)
             else None for key in ("chosen", "rejected")]
    if not all(side is not None and is_answer_list(side) for side in sides) or not any(sides):
        return
    if all(isinstance(row[key], str) for key in ("chosen", "rejected")):
        raise DataError("chosen and rejected hold lists of answers written as text (a list's JSON or Python repr "
                        "inside a string: RewardBench 2's best-of-N layout), which would be scored as one answer "
                        "each; write each as a list, not a string (a CSV file's cells are read as lists where its "
                        "first row holds such lists in both)", file=file, row=row_number, field="chosen")
    raise DataError("chosen and rejected are lists of answers (RewardBench 2's best-of-N layout), not one answer "
                    "each: download and score read pairs; score such a file as an evaluation suite "
                    "(evaluate.suites)", file=file, row=row_number, field="chosen")


def _is_hh_prompt(text: str) -> bool:
    """An HH transcript up to the reply (Dahoas/rm-static): the answer is the Assistant's next turn."""
    text = text.replace("\r\n", "\n")
    return text.lstrip().startswith("Human:") and text.rstrip().endswith("\n\nAssistant:")


def _transcript(row: dict, side: str) -> list[dict]:
    if is_blank(row[side].strip()):  # no transcript to be malformed: an empty answer, as in the other layouts
        raise Rejected("empty_side", f"empty {side} response (nothing but spaces or invisible characters)")
    try:
        return parse_hh_transcript(row[side])
    except Rejected as reject:
        others = sorted(str(k) for k in row if k not in USED_COLUMNS)
        hint = ("; chosen and rejected are strings and there is no prompt column, so each is read as a whole "
                "HH-RLHF transcript" + (f": if {', '.join(others)} holds the prompt, name that column 'prompt'"
                                         if others else ""))
        raise Rejected(reject.reason, reject.detail + hint) from None


def _same_turns(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
                                    for x, y in zip(a, b))


def _without_repeated_prompt(prompt: list[dict], chosen: list[dict],
                             rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """An explicit prompt that the answers repeat (HuggingFaceH4/ultrafeedback_binarized: chosen is the
    whole conversation) is kept once: where both answers open with its turns, they are cut off; where
    the turns both share open the conversation (a system or user turn, not an answer's) and end with its
    turns (system turns before it, or a multi-turn conversation whose prompt column is its last user
    turn), those shared turns are the prompt. A prompt that only one side
    repeats leaves the pair ambiguous, and so do answers that open with a user turn after a prompt that
    ends with one (another copy of the conversation that differs from the prompt column)."""
    if not prompt or not chosen or chosen == rejected:
        return prompt, chosen, rejected
    n = len(prompt)
    opens = [_same_turns(side[:n], prompt) for side in (chosen, rejected)]
    if all(opens):
        return prompt, chosen[n:], rejected[n:]
    shared, chosen_rest, rejected_rest = split_shared_prefix(chosen, rejected)
    lead = len(shared) - n
    if lead > 0 and _same_turns(shared[lead:], prompt) and shared[0]["role"] != "assistant":
        return shared, chosen_rest, rejected_rest
    if any(opens):
        repeats, other = ("chosen", "rejected") if opens[0] else ("rejected", "chosen")
        raise Rejected("prompt_repeated", f"{repeats} starts with the prompt's turns and {other} does not")
    for k in range(n - 1, 0, -1):  # both repeat the prompt's last turns only (a system turn or history not)
        if all(_same_turns(side[:k], prompt[-k:]) for side in (chosen, rejected)):
            return prompt, chosen[k:], rejected[k:]
    if prompt[-1]["role"] == "user" and all(side and side[0]["role"] == "user" for side in (chosen, rejected)):
        raise Rejected("prompt_mismatch", "the prompt ends with a user turn and both answers open with one: they "
                                         "hold a conversation of their own beside the prompt column (other text "
                                         "than its, or earlier turns the two answers do not share)")
    return prompt, chosen, rejected


def _with_system(system: Any, prompt: list[dict], *, file: str, row_number: int) -> list[dict]:
    """A `system` column (Intel/orca_dpo_pairs) opens the prompt, unless the prompt has a system turn."""
    if system is None or (isinstance(system, str) and not system.strip()):
        return prompt
    if not isinstance(system, str):
        raise DataError(f"expected a string, got {type(system).__name__}", file=file, row=row_number, field="system")
    if prompt and prompt[0]["role"] == "system":
        if prompt[0]["content"].strip() != system.strip():
            raise Rejected("system_mismatch", "the prompt opens with a system turn of other text than the system "
                                             "column")
        return prompt
    return [{"role": "system", "content": system}, *prompt]


def _safe_text(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate as its \\udxxx escape


def json_safe(value: Any) -> Any:
    """A set-aside row as it can be written to a JSON Lines file: a row is set aside for its chosen,
    rejected or scores, so its other columns (a Parquet datetime or bytes, a lone surrogate) must not
    stop the writing of the rejects. Values JSON cannot hold become their text."""
    if isinstance(value, str):
        return _safe_text(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {_safe_text(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return _safe_text(str(value))


class Normaliser:
    """Normalise the rows of one source file. The format is fixed by the first row; a later row
    of another shape is an error, not a guess. `format` tells what was found."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.format: str | None = None
        self.ignored_columns: Counter[str] = Counter()

    def __call__(self, rows: Iterable[tuple[int, dict]]) -> Iterator[tuple[str, dict]]:
        """Yield ("pair", pair) or ("reject", record) for each (row_number, row)."""
        for row_number, row in rows:
            row_fmt = detect_format(row, file=self.file, row_number=row_number)
            self.ignored_columns.update(_safe_text(str(k)) for k in row if k not in USED_COLUMNS)
            self.ignored_columns.update(_safe_text(k) for k in left_out_keys(row))
            if self.format is None:
                self.format = row_fmt
            elif row_fmt != self.format:
                kinds = {"text": "a string", "conversational": "a list of messages"}
                began, now = (f.rsplit("_", 1)[-1] for f in (self.format, row_fmt))
                if began != now and began in kinds and now in kinds:  # the same columns, `chosen` of another type
                    raise DataError(f"expected {kinds[began]} like the other rows of this file, got "
                                    f"{type(row['chosen']).__name__}", file=self.file, row=row_number, field="chosen")
                raise DataError(f"row is in format {row_fmt}, but the file began in format {self.format}",
                                file=self.file, row=row_number)
            try:
                yield "pair", normalise_row(row, self.format, file=self.file, row_number=row_number)
            except Rejected as reject:
                yield "reject", {"file": self.file, "row": row_number, "reason": reject.reason,
                                 "detail": reject.detail, "data": json_safe(row)}
