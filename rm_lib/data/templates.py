"""Chat templates: messages -> text. Special tokens are added once, at tokenization.

Named templates render each message on its own, so the rendering of a prompt is a prefix of the
rendering of the whole conversation and its token count is the prompt length. A tokenizer's template
need not (conversation_opening).
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

# The day every text is rendered as on: a template that writes the date (Llama 3.1-3.3's "Today Date",
# gpt-oss's, Mistral Small 3's) gave other ids each day, so tokenize was not reproducible and a model
# scored on another day read other texts than it trained on. Llama 3.1's own date where no clock is given.
TEMPLATE_DAY = datetime(2024, 7, 26)
_RENDERING = threading.local()  # set while this thread renders through `render`

ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}


def simple_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    text = "\n\n".join(f"{ROLE_NAMES[m['role']]}: {m['content']}" for m in messages)
    if add_generation_prompt:
        text += ("\n\n" if text else "") + "Assistant:"
    return text


def simple_concat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    return "\n".join(m["content"] for m in messages)


def chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


NAMED = {"simple_chat": simple_chat, "simple_concat": simple_concat, "chatml": chatml}


def resolve(name: str, tokenizer: Any, recorded: str | None = None) -> str:
    """'auto' means the template the model was trained with where it records one (`recorded`: a reward
    model this project trained, whose rm_lib.json names it), else the tokenizer's own template when it
    has one, else simple_chat."""
    if name == "auto" and recorded in NAMED:
        return recorded
    if name == "auto":
        return "tokenizer" if getattr(tokenizer, "chat_template", None) else "simple_chat"
    if name == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        from rm_lib.errors import SettingsError

        raise SettingsError("tokenize.template: 'tokenizer' was asked for, but this tokenizer has no chat "
                            "template; use auto, simple_chat, simple_concat or chatml")
    return name


def _default_template(tokenizer: Any) -> str:
    """The chat template apply_chat_template uses: a tokenizer may hold several by name."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return str(template.get("default", "")) if isinstance(template, dict) else str(template)


def reads_clock(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template writes the day it renders on (transformers' strftime_now)."""
    return "strftime_now" in _default_template(tokenizer)


class _Day(datetime):
    """transformers' chat templates read the clock through this: TEMPLATE_DAY while this thread renders
    through `render`, the clock itself for everyone else (a policy's prompts rendered in another thread)."""

    @classmethod
    def now(cls, tz: Any = None) -> datetime:
        return TEMPLATE_DAY if getattr(_RENDERING, "on", False) else datetime.now(tz)


_INSTALL = threading.Lock()


@contextlib.contextmanager
def _template_day() -> Iterator[None]:
    """This thread's renders read the clock as TEMPLATE_DAY meanwhile. transformers' strftime_now reads its
    module's `datetime` when called (a template argument cannot replace a function: transformers turns
    it into text), which becomes _Day once."""
    from transformers.utils import chat_template_utils

    with _INSTALL:
        if chat_template_utils.datetime is not _Day:
            chat_template_utils.datetime = _Day
    before = getattr(_RENDERING, "on", False)
    _RENDERING.on = True
    try:
        yield
    finally:
        _RENDERING.on = before


# The wrap a model's chat template is saved in (tokenization.template_as_trained): the text it renders ends
# with the EOS training read the reward at, for readers that add no special tokens (TRL's reward functions,
# apply_chat_template(..., tokenize=True)). rm_lib renders with the template inside, as training did.
_WRAP_OPEN = '{% set rm_lib_text %}{{ "" }}'
_WRAP_CLOSE = ("{% endset %}{{ rm_lib_text }}"
               "{% if not add_generation_prompt and not rm_lib_text.endswith(eos_token) %}{{ eos_token }}{% endif %}")


def ending_with_eos(template: str) -> str:
    """`template` wrapped so that a whole conversation's text ends with the EOS (none after a generation
    prompt, and no second one where it writes one). Jinja drops one newline at a template's end and
    trim_blocks one after a block tag: the `{{ "" }}` and the cut newline keep the text the template's own."""
    return _WRAP_OPEN + (template[:-1] if template.endswith("\n") else template) + _WRAP_CLOSE


# an earlier version of the wrap wrote the BOS too (a BOS written as text doubled under `pipeline`)
_WRAP_CLOSES = (_WRAP_CLOSE, _WRAP_CLOSE.replace(
    "{{ rm_lib_text }}", "{% if not rm_lib_text.startswith(bos_token) %}{{ bos_token }}{% endif %}{{ rm_lib_text }}", 1))


def trained_template(tokenizer: Any) -> str | None:
    """The chat template training rendered with, where the tokenizer holds it wrapped (ending_with_eos);
    None where its own template is that one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template.startswith(_WRAP_OPEN):
        for close in _WRAP_CLOSES:
            if template.endswith(close):
                return template[len(_WRAP_OPEN):len(template) - len(close)]
    return None


def render(messages: list[dict], name: str, tokenizer: Any, add_generation_prompt: bool = False, *,
           released: bool = False) -> str:
    """`messages` as text in template `name`. The tokenizer's chat template is the one training rendered
    with (trained_template); `released`: the one the tokenizer holds, as a reader of the release renders."""
    if name == "tokenizer":
        if not messages:
            return ""
        trained = None if released else trained_template(tokenizer)
        with _template_day() if reads_clock(tokenizer) else contextlib.nullcontext():
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 **({"chat_template": trained} if trained is not None else {}))
    return NAMED[name](messages, add_generation_prompt)


_PROMPT, _ANSWER = [{"role": "user", "content": "rm-lib-prompt"}], "rm-lib-answer-7f3a"


def _exchange(name: str, tokenizer: Any, answer: str = _ANSWER) -> tuple[str, str] | None:
    """(a lone user turn rendered with the generation prompt, that turn and `answer` rendered whole);
    None where the template refuses them (one wants a system turn first: none known)."""
    try:
        return (render(_PROMPT, name, tokenizer, add_generation_prompt=True),
                render([*_PROMPT, {"role": "assistant", "content": answer}], name, tokenizer))
    except Exception:  # noqa: BLE001 - a template's own refusal, of any type
        return None


def turn_closing(name: str, tokenizer: Any) -> str:
    """What the template writes after an assistant's answer (chatml's `<|im_end|>\\n`; '' for simple_chat):
    a text prompt's completion, closed with it, ends as training's texts did. '' where the template does
    not write the answer as given, or refuses a lone user turn and answer."""
    rendered = _exchange(name, tokenizer)
    whole = rendered[1] if rendered else ""
    return whole[whole.rindex(_ANSWER) + len(_ANSWER):] if _ANSWER in whole else ""


def generation_tail(name: str, tokenizer: Any) -> str:
    """The end of the generation prompt that a whole conversation does not hold: the start of the answer
    it writes for the model (DeepSeek-R1's `<think>\\n`, which its template then drops from every answer
    it renders). '' where the generation prompt begins the whole rendering, as it does for most."""
    rendered = _exchange(name, tokenizer)
    if rendered is None or rendered[1].startswith(rendered[0]):
        return ""
    return rendered[0][len(os.path.commonprefix(rendered)):]


def answer_text(answer: str, name: str, tokenizer: Any, tail: str = "") -> str | None:
    """What the template writes after its generation prompt, less its `tail` (generation_tail), for an
    assistant's `answer` that follows the tail: its opening (a space, a line break, an empty think block),
    the answer as it renders it (a chat template may rewrite a think block), and its closing. A text
    prompt rendered with the generation prompt, less the tail, followed by this, is the text training
    read for the exchange. None where the template refuses a lone exchange, or its whole rendering does
    not begin with the generation prompt's, less the tail."""
    rendered = _exchange(name, tokenizer, tail + answer)
    if rendered is None:
        return None
    opened = rendered[0][:len(rendered[0]) - len(tail)]
    return rendered[1][len(opened):] if rendered[1].startswith(opened) else None


def with_stand_in(prompt: list[dict], name: str, tokenizer: Any) -> str:
    """`prompt` and a stand-in answer rendered whole ('' where the template refuses them)."""
    try:
        return render([*prompt, {"role": "assistant", "content": _ANSWER}], name, tokenizer)
    except Exception:  # noqa: BLE001 - a template's own refusal, of any type
        return ""


def conversation_opening(prompt: list[dict], name: str, tokenizer: Any, generation: str,
                         wholes: Sequence[str], stand_in: str | None = None) -> str:
    """The text that `wholes` (`prompt` and an answer, rendered whole) begin with as the prompt's, where
    they do not begin with `generation`, the prompt rendered with the generation prompt: a template may
    write a prompt otherwise before an answer (DeepSeek-R1's generation prompt opens a think block that
    its answers drop; Mistral v0.3's writes a system turn only into a last user turn). The prompt with a
    stand-in answer rendered whole (`stand_in`, where the caller has it: with_stand_in), up to that answer,
    as far as `wholes` agree with it."""
    whole = with_stand_in(prompt, name, tokenizer) if stand_in is None else stand_in
    start = whole[:whole.index(_ANSWER)] if _ANSWER in whole else generation
    return os.path.commonprefix([start, *wholes])


def left_out(prompt: list[dict], whole: str) -> bool:
    """Whether `whole`, a rendering of the prompt's conversation, lacks the text of one of its system or
    user turns: a template may drop it (Mistral v0.3's drops a system turn before an answer)."""
    texts = [m["content"].strip() for m in prompt if m.get("role") != "assistant" and isinstance(m.get("content"), str)]
    return any(text and text not in whole for text in texts)


def turn_opening(name: str, tokenizer: Any) -> str:
    """What the template writes between its generation prompt and an assistant's answer (simple_chat's
    space after `Assistant:`, simple_concat's line break; '' for chatml): a text completion joined to a
    prompt rendered with the generation prompt gets it, as training's texts had it. The generation prompt
    stops before it, so that its tokens stay a prefix of the whole conversation's (prompt lengths)."""
    rendered = _exchange(name, tokenizer)
    if rendered is None or _ANSWER not in rendered[1] or not rendered[1].startswith(rendered[0]):
        return ""
    return rendered[1][len(rendered[0]):rendered[1].index(_ANSWER)]
