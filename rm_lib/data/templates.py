"""Chat templates: messages -> text. Special tokens are added once, at tokenization.

Named templates render each message on its own, so the rendering of a prompt is a prefix of the
rendering of the whole conversation and its token count is the prompt length.
"""
from __future__ import annotations

from typing import Any

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


def render(messages: list[dict], name: str, tokenizer: Any, add_generation_prompt: bool = False) -> str:
    if name == "tokenizer":
        if not messages:
            return ""
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
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


def answer_text(answer: str, name: str, tokenizer: Any) -> str | None:
    """What the template writes after its generation prompt for an assistant's `answer`: its opening (a
    space, a line break, an empty think block), the answer as it renders it (a chat template may rewrite
    a think block), and its closing. A text prompt rendered with the generation prompt, followed by this,
    is the text training read for the exchange. None where the template refuses a lone exchange, or its
    whole rendering does not begin with the generation prompt's."""
    rendered = _exchange(name, tokenizer, answer)
    if rendered is None or not rendered[1].startswith(rendered[0]):
        return None
    return rendered[1][len(rendered[0]):]


def turn_opening(name: str, tokenizer: Any) -> str:
    """What the template writes between its generation prompt and an assistant's answer (simple_chat's
    space after `Assistant:`, simple_concat's line break; '' for chatml): a text completion joined to a
    prompt rendered with the generation prompt gets it, as training's texts had it. The generation prompt
    stops before it, so that its tokens stay a prefix of the whole conversation's (prompt lengths)."""
    rendered = _exchange(name, tokenizer)
    if rendered is None or _ANSWER not in rendered[1] or not rendered[1].startswith(rendered[0]):
        return ""
    return rendered[1][len(rendered[0]):rendered[1].index(_ANSWER)]
