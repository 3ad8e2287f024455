"""Tokenize normalised pairs once: rendered text is tokenized without special tokens, and the
start/end tokens the model expects are added only where the text does not already hold them.
That is what keeps a chat template's BOS from being doubled and every sequence ending in EOS."""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from rm_lib.data import formats, templates
from rm_lib.errors import DataError
from rm_lib.model.special import SpecialTokens, add_special, special_tokens  # noqa: F401 (used here, and as tokenization.*)

PRETOKENIZED_FIELDS = ("input_ids_chosen", "input_ids_rejected")


def check_token_ids(pairs: list[dict], vocab_size: int, *, file: str | None) -> None:
    """Pretokenized ids index the model's embeddings: one outside 0..vocab_size-1 would crash training,
    so it stops here, named by the field and the row. `file`: the pairs file the pairs are the rows of,
    in order (1-based), its pair's source row named beside; None where they come from source files with
    rows set aside between them (score): each is named by its own file and row, which its id holds."""
    for row, pair in enumerate(pairs, start=1):
        for field in PRETOKENIZED_FIELDS:
            ids = pair.get(field)
            if ids and (min(ids) < 0 or max(ids) >= vocab_size):
                bad = next(i for i in ids if not 0 <= i < vocab_size)
                source, number = formats.pair_source(pair["id"]) if file is None else (file, row)
                pair_named = f" in pair {pair['id']}" if file is not None else ""
                raise DataError(f"token id {bad} is outside the model's vocabulary (ids 0 to {vocab_size - 1})"
                                f"{pair_named}; pretokenized ids must come from the model's own tokenizer",
                                file=source, row=number, field=field)


def prefixed_length(ids: list[int], special: SpecialTokens) -> int:
    """len(ids) once add_special's prefix is in front: a template that writes the BOS itself has it already."""
    n = len(special.prefix)
    return len(ids) + (0 if n and tuple(ids[:n]) == special.prefix else n)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []


def _render(pair: dict, side: str, template: str, tokenizer: Any) -> str:
    """The prompt (with the generation prompt), or the prompt and one answer, as text. A chat template
    may refuse messages (Gemma's takes no system turn, Mistral's wants turns that alternate)."""
    messages = pair["prompt"] if side == "prompt" else pair["prompt"] + pair[side]
    try:
        return templates.render(messages, template, tokenizer, add_generation_prompt=side == "prompt")
    except Exception as exc:  # jinja2's TemplateError, or raise_exception() in the template
        if template != "tokenizer":
            raise
        roles = " ".join(m["role"] for m in messages)
        raise DataError(f"the tokenizer's chat template refused pair {pair['id']} (source file:row), {side} with "
                        f"turns {roles}: {str(exc).strip()[:200]}; set tokenize.template=simple_chat or chatml, or "
                        "use a model whose template takes such turns") from None


def _shared(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))


def prompt_length(prompt: list[dict], rendered: str, prompt_ids: list[int], wholes: list[str],
                  whole_ids: list[list[int]], tokenizer: Any, template: str, special: SpecialTokens,
                  stand_in: str | None = None) -> int:
    """How many first tokens of `whole_ids` (the prompt's conversation with an answer each, as the model
    reads them, their text `wholes`) are the prompt's: those of `rendered`, the prompt with the generation
    prompt (its ids `prompt_ids`, start token added where missing), where every whole begins with it; else
    the tokens the wholes begin with as the prompt (templates.conversation_opening), whose length would
    otherwise count what the sides do not hold (a system turn the template writes only before a last user
    turn: every pair dropped as prompt_too_long). `stand_in`: the prompt rendered whole with
    templates' stand-in answer, where the caller has it."""
    if not rendered:
        return 0
    if all(whole.startswith(rendered) for whole in wholes):
        return prefixed_length(prompt_ids, special)
    text = templates.conversation_opening(prompt, template, tokenizer, rendered, wholes, stand_in)
    ids = _encode(tokenizer, [text])[0] if text else []
    ids = list(special.prefix) + ids if prefixed_length(ids, special) > len(ids) else ids
    return min([len(ids), *(_shared(ids, whole) for whole in whole_ids)])


def tokenize_batch(pairs: list[dict], tokenizer: Any, template: str, special: SpecialTokens,
                   refused: list[dict] | None = None) -> list[dict]:
    """Normalised pairs -> rows with the model's input columns, in one batched tokenizer call (and one more
    per pair whose template writes its prompt otherwise before an answer: prompt_length). A row whose
    rendering lacks the text of a system or user turn of its prompt carries `prompt_left_out` (the step
    counts them). A pair the chat template refuses is a DataError, or, given `refused`, set aside there
    ({"id", "reason": "template_refused", "why"}): one odd row of a large set (two assistant turns in a
    row, under Mistral's template) stopped the whole step."""
    prompts, chosen, rejected, aside = [], [], [], set()
    for pair in pairs:
        if "input_ids_chosen" in pair:
            continue
        try:
            texts = (_render(pair, "prompt", template, tokenizer) if pair["prompt"] else "",
                     _render(pair, "chosen", template, tokenizer), _render(pair, "rejected", template, tokenizer))
        except DataError as exc:
            if refused is None:
                raise
            refused.append({"id": pair["id"], "reason": "template_refused", "why": str(exc)})
            aside.add(pair["id"])
            continue
        for texts_of, text in zip((prompts, chosen, rejected), texts):
            texts_of.append(text)
    texts = iter(zip(prompts, chosen, rejected))
    encoded = iter(zip(_encode(tokenizer, prompts), _encode(tokenizer, chosen), _encode(tokenizer, rejected)))
    rows = []
    for pair in pairs:
        if pair["id"] in aside:
            continue
        left = False
        if "input_ids_chosen" in pair:  # pretokenized: trust the ids, but still end every side with EOS
            ids_c, ids_r, prompt_len = pair["input_ids_chosen"], pair["input_ids_rejected"], None
            ids_c, ids_r = add_special(ids_c, special), add_special(ids_r, special)
        else:
            (prompt, text_c, text_r), (prompt_ids, ids_c, ids_r) = next(texts), next(encoded)
            ids_c, ids_r = add_special(ids_c, special), add_special(ids_r, special)
            prompt_len = prompt_length(pair["prompt"], prompt, prompt_ids, [text_c, text_r], [ids_c, ids_r], tokenizer,
                                       template, special)
            left = template == "tokenizer" and any(templates.left_out(pair["prompt"], t) for t in (text_c, text_r))
        rows.append({"id": pair["id"], "input_ids_chosen": ids_c, "attention_mask_chosen": [1] * len(ids_c),
                     "input_ids_rejected": ids_r, "attention_mask_rejected": [1] * len(ids_r),
                     "prompt_length": prompt_len, "margin": pair.get("margin"), "subset": pair.get("subset"),
                     **({"prompt_left_out": True} if left else {})})
    return rows


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, template: str) -> None:
    # a forked worker inherits the tokenizers library's thread pool, dead in it: with TOKENIZERS_PARALLELISM
    # set (the CLI sets it) its first batch waited for ever on it. Each worker tokenizes on one thread.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # a stop (Ctrl-C, or SIGTERM to the process group) is the parent's to handle, which shuts the pool down:
    # the CLI's SIGTERM handler, inherited, printed a traceback from every idle worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from rm_lib.model.modeling import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    _WORKER.update(tokenizer=tokenizer, template=template, special=special_tokens(tokenizer))


def _worker_batch(pairs: list[dict], set_aside: bool) -> tuple[list[dict], list[dict]]:
    refused: list[dict] = []
    rows = tokenize_batch(pairs, _WORKER["tokenizer"], _WORKER["template"], _WORKER["special"],
                          refused if set_aside else None)
    return rows, refused


def tokenize_pairs(pairs: list[dict], tokenizer: Any, template: str, *, batch_size: int = 1000,
                   num_proc: int = 1, tokenizer_path: str | None = None) -> list[dict]:
    """All pairs' rows, in order (tokenize_batches, gathered)."""
    return [row for batch in tokenize_batches(pairs, tokenizer, template, batch_size=batch_size, num_proc=num_proc,
                                              tokenizer_path=tokenizer_path) for row in batch]


def tokenize_batches(pairs: list[dict], tokenizer: Any, template: str, *, batch_size: int = 1000,
                     num_proc: int = 1, tokenizer_path: str | None = None,
                     refused: list[dict] | None = None) -> Iterator[list[dict]]:
    """The pairs' rows a batch at a time, in order: the tokenize step writes each as it comes. Fast
    tokenizers already use several threads per batch; with num_proc > 1 the template rendering (Python)
    also runs in parallel processes. `refused`: as tokenize_batch's."""
    special = special_tokens(tokenizer)
    batches = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
    if num_proc > 1 and len(batches) > 1 and tokenizer_path is not None:
        pool = ProcessPoolExecutor(num_proc, initializer=_init_worker, initargs=(tokenizer_path, template))
        try:
            for rows, aside in pool.map(_worker_batch, batches, [refused is not None] * len(batches)):
                if refused is not None:
                    refused += aside
                yield rows
        finally:  # a batch that failed, or a reader that stopped: the batches not begun are not waited for
            pool.shutdown(wait=True, cancel_futures=True)
        return
    for batch in batches:
        yield tokenize_batch(batch, tokenizer, template, special, refused)


# Conversations a release's chat template must render to the ids training read (template_as_trained).
_CHECKED = ([{"role": "user", "content": "How do I boil an egg?"},
             {"role": "assistant", "content": "Put it in boiling water for eight minutes."}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
             {"role": "assistant", "content": "Blue."}],
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "And then?"}, {"role": "assistant", "content": " Then\nnothing. "}])


def template_as_trained(tokenizer: Any) -> Any:
    """A copy of `tokenizer` whose chat template ends a whole conversation with the EOS training read the
    reward at (templates.ending_with_eos): its text, tokenized with no special tokens, as
    `apply_chat_template(..., tokenize=True)` and TRL's reward functions do, then holds the ids training
    read, but for a start token the tokenizer adds (given as text, a BOS doubles under `pipeline`, and a
    SentencePiece one changes the word start after it: the model card names it). `tokenizer` as given
    where its template writes the EOS already, where the wrapped one renders a checked conversation
    otherwise, where it marks assistant tokens (`{% generation %}`: the wrap would move the marks), or
    holds several named templates."""
    import copy
    import re

    special = special_tokens(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or special.end is None or special.end != tokenizer.eos_token_id \
            or re.search(r"{%-?\s*generation\s*-?%}", template):
        return tokenizer
    prefix_only = SpecialTokens(prefix=special.prefix, end=None)

    def renders_as_trained(candidate: Any) -> bool:
        judged = 0
        for chat in _CHECKED:
            try:
                wanted = add_special(_encode(tokenizer, [templates.render(chat, "tokenizer", tokenizer)])[0], special)
            except Exception:  # noqa: BLE001 - a template's refusal (a system turn, say): nothing to judge by
                continue
            try:
                text = templates.render(chat, "tokenizer", candidate, released=True)
            except Exception:  # noqa: BLE001 - the wrapped template refuses what the template took
                return False
            if add_special(_encode(candidate, [text])[0], prefix_only) != wanted:
                return False
            judged += 1
        return judged > 0

    if templates.trained_template(tokenizer) is not None or renders_as_trained(tokenizer):
        return tokenizer  # wrapped already (a release trained on again), or it writes the EOS itself
    candidate = copy.deepcopy(tokenizer)
    candidate.chat_template = templates.ending_with_eos(template)
    if "chat_template" in candidate.init_kwargs:
        candidate.init_kwargs["chat_template"] = candidate.chat_template
    return candidate if renders_as_trained(candidate) else tokenizer
