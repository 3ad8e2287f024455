"""Score texts or conversations with a trained reward model, for evaluation and RLHF.

    scorer = RewardScorer("models/reward_model")
    scorer.score(["User: hi\\n\\nAssistant: hello"])
    scorer.score([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])
    GRPOTrainer(..., reward_funcs=scorer.reward_function())
"""
from __future__ import annotations

import json
import math
import operator
import sys
from collections.abc import Callable, Iterable, MappingView, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rm_lib.data import formats, templates, tokenization
from rm_lib.data.length_filter import front_length, truncate_left
from rm_lib.errors import DataError, SettingsError
from rm_lib.model.batching import in_batches, right_padded
from rm_lib.model.modeling import (
    adapter_advice,
    load_model_config,
    load_reward_model,
    load_tokenizer,
    max_sequence_length,
    resolve_model_path,
    rewards,
)
from rm_lib.model.special import SpecialTokens
from rm_lib.settings import TEMPLATES, names_a_folder, shown_value

LENGTH_POLICIES = ("truncate", "drop")


@dataclass
class Scored:
    rewards: list[float]
    truncated: list[bool]  # per item: cut to the model's length, keeping the end
    lengths: list[int]  # per item: tokens before any cut


def model_max_length(model: Any, tokenizer: Any) -> int | None:
    """The most tokens the model reads: its position table, or the tokenizer's limit where that is
    smaller (RoBERTa-style position tables carry an offset). None where neither is known."""
    return max_sequence_length(model.config, tokenizer)  # the limit filter.max_token_length is checked against


def training_record(model: str) -> dict:
    """The model's rm_lib.json (the template and lengths training used): from its folder, or from the
    Hub where `model` names a repository there (a release this project pushed holds one); {} for a model
    without one. One that cannot be read is a DataError naming it, not a traceback or other lengths."""
    folder = Path(model).expanduser()
    if folder.is_dir() or folder.exists():
        path = folder / "rm_lib.json"
        if not path.is_file():
            return {}
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:  # the weights loaded from there already: the repository exists, and the Hub answered (or its cache)
            path = Path(hf_hub_download(model, "rm_lib.json"))
        except LocalEntryNotFoundError:  # offline, and not cached (transformers fetched the weights without it)
            print(f"note: {model}: whether it has an rm_lib.json (a release of this project has: its template and "
                  "lengths) cannot be told offline, and none is cached; scored as another project's model, up to "
                  f"its positions. Fetch it with `hf download {model} rm_lib.json` for the model's own",
                  file=sys.stderr)
            return {}
        except EntryNotFoundError:  # no rm_lib.json there: another project's model
            return {}
    where = str(folder / "rm_lib.json") if folder.exists() else f"{model}: rm_lib.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep to read
        raise DataError(f"not valid JSON ({exc}); train writes it: train again, or remove it to score the model "
                        "as one of another project (up to its positions)", file=where) from None
    if not isinstance(record, dict):
        raise DataError(f"expected an object, got {type(record).__name__}", file=where)
    _check_record(record, where)
    return record


def local_training_record(name_or_path: str) -> dict:
    """training_record of a local model folder (a base model this project trained, given as its folder or
    release); {} for a Hub id, whose rm_lib.json is not fetched for a base model."""
    folder = Path(resolve_model_path(name_or_path))
    return training_record(str(folder)) if folder.is_dir() else {}


def _check_record(record: dict, where: str) -> None:
    template = record.get("template")
    if template is not None and template not in ("auto", "tokenizer", *templates.NAMED):
        raise DataError(f"unknown template {template!r}", file=where, field="template")
    lengths = record.get("lengths")
    if lengths is None:
        return
    if not isinstance(lengths, dict):
        raise DataError(f"expected an object, got {type(lengths).__name__}", file=where, field="lengths")
    for key in ("max_token_length", "max_prompt_token_length"):
        value = lengths.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 2):
            raise DataError(f"expected a whole number of at least 2 or null, got {value!r}", file=where,
                            field=f"lengths.{key}")
    if lengths.get("policy") not in (None, *LENGTH_POLICIES):
        raise DataError(f"expected truncate, drop or null, got {lengths.get('policy')!r}", file=where,
                        field="lengths.policy")


class RewardScorer:
    """`length_policy`: what happens to a text longer than the model reads (`max_length`, by default the
    length its training pairs were held to, from its rm_lib.json, else its positions): "truncate" keeps
    its start tokens and its end, as filter.policy=truncate does in training; "drop" refuses it with a
    DataError naming the item. `setting`: what an error about the model names it by (the CLI: --model)."""

    def __init__(self, model_dir: str | Path, *, template: str | None = None, device: str | None = None,
                 batch_size: int = 32, normalize: bool = False, length_policy: str = "truncate",
                 max_length: int | None = None, setting: str = "model_dir") -> None:
        if length_policy not in LENGTH_POLICIES:
            raise SettingsError(f"length_policy: must be 'truncate' or 'drop', got {length_policy!r}")
        whole = _whole(batch_size)
        if whole is None or whole < 1:
            raise SettingsError(f"batch_size: must be a whole number of at least 1, got {batch_size!r}")
        batch_size = whole
        if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                       or max_length < 2):
            raise SettingsError(f"max_length: must be a whole number of at least 2 (a start and an end token) or "
                                f"None (the model's limit), got {max_length!r}")
        if template is not None and template not in TEMPLATES:
            raise SettingsError(f"template: unknown template {template!r}; use {', '.join(TEMPLATES)}")
        self.device = _device(device)
        check_model_folder(model_dir, setting)
        if Path(model_dir).expanduser().exists():  # ~ read as the loaders do not: a Hub id otherwise
            model_dir = Path(model_dir).expanduser()
        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(str(model_dir), setting=setting)
        # the pad load_tokenizer may add (a model that pads with its EOS, or has no pad) needs its embedding row
        self.model = load_reward_model(str(model_dir), trained=True, pad_token_id=self.tokenizer.pad_token_id,
                                       setting=setting)
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.special = tokenization.special_tokens(self.tokenizer)
        saved = training_record(str(model_dir))
        self.saved = saved  # rm_lib.json: the template and the lengths training held pairs to
        check_tokenizer_as_trained(str(model_dir), self.tokenizer, self.special, saved, template)
        recorded = saved.get("template")
        self.template = templates.resolve(template or "auto", self.tokenizer, recorded)
        # another project's model (no rm_lib.json: TRL's, any save_pretrained one) is scored on the ids TRL trains on
        # and read where transformers reads them: rm_lib's own way (an end token added to every text, the reward read
        # there) gave a TRL model other rewards than TRL's, unsaid. Its config's pad (before load_tokenizer gave it
        # one of its own) is what transformers reads the reward before. One of this project's models that lost its
        # rm_lib.json (a save_pretrained copy) still names its run in its config.
        self.foreign = not saved and getattr(self.model.config, "rm_lib_fingerprint", None) is None
        self.pad_read_past = (load_model_config(str(model_dir), weights=False, setting=setting).pad_token_id
                              if self.foreign else None)
        # a text: its start token and an end token, as TRL and OpenRLHF add one to a text they train on
        self.text_special = self.special
        if self.foreign and self.template == "tokenizer":
            # a conversation its chat template rendered: nothing added (apply_chat_template(tokenize=True) adds
            # nothing, and TRL trains on its ids as they are)
            self.special = SpecialTokens(prefix=(), end=None, template_start=self.tokenizer.bos_token_id)
        self.mean, self.std = _normalisation(self.model.config, self.model_dir) if normalize else (0.0, 1.0)
        self.length_policy = length_policy
        limit = model_max_length(self.model, self.tokenizer)
        if max_length is not None and limit is not None and max_length > limit:
            raise SettingsError(f"max_length: {max_length} is more than the {limit} tokens the model reads")
        trained = (saved.get("lengths") or {}).get("max_token_length")  # as score and evaluate hold its pairs
        limits = [n for n in (trained, limit) if n is not None]
        self.max_length = max_length or (min(limits) if limits else None)
        # a prompt is cut to this where the caller says which tokens are the prompt (prompt_length), as filter
        # cut the model's pairs: only under policy truncate (under drop it cut none, and scored none such)
        lengths = saved.get("lengths") or {}
        self.max_prompt = lengths.get("max_prompt_token_length") if lengths.get("policy") == "truncate" else None

    def encode(self, item: str | list[dict], name: str = "item") -> list[int]:
        """Text is tokenized as is; a conversation is rendered with the training template. Anything else
        (a number, None, a message with an unknown role or no text) is a DataError naming `name`."""
        item = formats.scoring_item(item, name, any_role=self.template == "tokenizer")
        text = item if isinstance(item, str) else templates.render(item, self.template, self.tokenizer)
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        special = self.text_special if isinstance(item, str) else self.special
        return self.as_read(tokenization.add_special(ids, special))

    def as_given(self, text: str, name: str) -> list[int]:
        """Another project's model given a text prompt and completion (TRL's GRPO): their ids as TRL gives them to
        a reward model, nothing added (the prompt rendered by the policy's template holds what it holds)."""
        formats.scoring_item(text, name)
        return self.as_read(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def as_read(self, ids: list[int]) -> list[int]:
        """`ids` as the model reads its reward from them: another project's model, as transformers reads it, at the
        last token that is not its config's pad (with pad == EOS, before the EOS)."""
        if self.foreign:
            while len(ids) > 1 and ids[-1] == self.pad_read_past:
                ids = ids[:-1]
        return ids

    def prompt_length(self, prompt: list[dict]) -> int:
        """The tokens of a conversation's prompt as tokenize counts them for a pair (tokenization.
        prompt_length, the prompt's conversation with a stand-in answer as its whole): what `fit` holds to
        the recorded prompt limit."""
        if not prompt:
            return 0
        text = templates.render(prompt, self.template, self.tokenizer, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        whole = templates.with_stand_in(prompt, self.template, self.tokenizer) or text  # refused: as rendered alone
        return tokenization.prompt_length(prompt, text, ids, [whole], [self.encode(whole)], self.tokenizer,
                                          self.template, self.special, stand_in=whole)

    def fit(self, ids: list[int], name: str, prompt_length: int = 0) -> tuple[list[int], bool]:
        """`ids` within max_length, and their first `prompt_length` tokens (the prompt) within the prompt
        limit training recorded, by the length policy (as filter's for a pair); True when they were cut."""
        over = self.max_prompt is not None and prompt_length > self.max_prompt
        if self.max_length is None or (len(ids) <= self.max_length and not over):
            return ids, False
        if self.length_policy == "drop":
            what = (f"a prompt of {prompt_length} tokens, more than the {self.max_prompt} training held prompts to"
                    if over else f"{len(ids)} tokens, more than the {self.max_length} the model reads")
            raise DataError(f"{name}: {what}; use length_policy='truncate' to keep the end of such texts, or "
                            "shorten it")
        cut = prompt_length - self.max_prompt if over else 0
        front = front_length(ids, len(self.special.prefix), self.special.template_start)
        return truncate_left(ids, self.max_length, front, cut), True

    def sure_tie(self, chosen: list[int], rejected: list[int], name: str, prompt_length: int = 0) -> str | None:
        """Why two encoded answers are a sure tie (their rewards equal but for rounding), or None:
        'identical_tokens', or 'identical_after_truncation' where the cut to max_length makes them one."""
        if chosen == rejected:
            return "identical_tokens"
        if self.length_policy == "truncate" and \
                self.fit(chosen, name, prompt_length)[0] == self.fit(rejected, name, prompt_length)[0]:
            return "identical_after_truncation"
        return None

    def score(self, items: Sequence[str | list[dict]]) -> list[float]:
        return self.score_detailed(items).rewards

    @torch.no_grad()
    def score_detailed(self, items: Sequence[str | list[dict]], names: Sequence[str] | None = None) -> Scored:
        """Rewards with, per item, whether it was truncated and its length; `names` label items in errors. A
        conversation's prompt (the messages before its closing assistant turns) is held to the recorded prompt
        limit as filter held the model's pairs' (policy truncate); a text's prompt is not known."""
        if isinstance(items, (str, dict)):  # a str would be scored character by character
            raise DataError(f"score takes a list of texts or conversations, got one {type(items).__name__}: "
                            "pass [item]")
        if not isinstance(items, Sequence):  # a generator, a numpy array, a pandas Series: read once, in order
            if not isinstance(items, Iterable) or isinstance(items, (Set, MappingView)):  # a set has no order
                raise DataError(f"score takes a list of texts or conversations, got {type(items).__name__}")
            items = list(items)
        if names is not None and not isinstance(names, Sequence):
            names = list(names)
        if names is not None and len(names) != len(items):
            raise DataError(f"score_detailed: {len(items)} items but {len(names)} names")
        labels = list(names) if names is not None else [f"item {i}" for i in range(len(items))]
        encoded = [self.encode(item, label) for item, label in zip(items, labels)]
        lengths = ([self.given_prompt_length(_prompt_of(item), label) if isinstance(item, list) else 0
                    for item, label in zip(items, labels)] if self.max_prompt is not None else None)
        return self.score_ids(encoded, names, lengths)

    @torch.no_grad()
    def score_ids(self, encoded: Sequence[list[int]], names: Sequence[str] | None = None,
                  prompt_lengths: Sequence[int] | None = None) -> Scored:
        """score_detailed for token ids as the model reads them (start and end tokens in place);
        `prompt_lengths`: how many of each item's first tokens are its prompt (fit holds them to the limit)."""
        fitted = [self.fit(ids, names[i] if names else f"item {i}", prompt_lengths[i] if prompt_lengths else 0)
                  for i, ids in enumerate(encoded)]
        # batches of like lengths (in input order, hh-rlhf padded to 2.96 times its tokens: BENCHMARKS.md); each reward
        # is its text's alone, so the order is put back after
        order = sorted(range(len(fitted)), key=lambda i: len(fitted[i][0]))

        def run(start: int, stop: int) -> list[float]:
            ids, mask = right_padded([fitted[i][0] for i in order[start:stop]], self.tokenizer.pad_token_id)
            scores = rewards(self.model, ids.to(self.device), mask.to(self.device))
            return ((scores - self.mean) / self.std).tolist()

        by_length = in_batches(len(fitted), self.batch_size, run, what="score", unit="texts")
        out = [0.0] * len(fitted)
        for position, i in enumerate(order):
            out[i] = by_length[position]
        return Scored(rewards=out, truncated=[cut for _, cut in fitted], lengths=[len(ids) for ids in encoded])

    def given_prompt_length(self, prompt: str | list[dict], name: str) -> int:
        """prompt_length for a prompt given apart from its answer: a conversation's as tokenize counts it, a
        text's tokens with the start token."""
        if isinstance(prompt, list):
            if not prompt:
                return 0
            return self.prompt_length(formats.scoring_item(prompt, name, any_role=self.template == "tokenizer"))
        formats.scoring_item(prompt, name)
        ids = self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        return tokenization.prefixed_length(ids, self.special)

    def reward_function(self) -> Callable[..., list[float]]:
        """A function with the signature TRL's GRPOTrainer and RLOOTrainer take in `reward_funcs`:
        f(prompts, completions, **kwargs) -> list of floats, for text or conversational data. The prompt is
        held to the limit training recorded as filter held it (policy truncate), as `score` holds a pair's.
        A text completion is rendered as the training template renders an assistant's answer after its
        generation prompt (opened, rewritten where the template rewrites one, closed; TRL decodes it
        without the policy's end token; after a generation prompt that opens a think block, as an answer that
        goes on from it): with a prompt rendered by that template, its generation prompt included, the text
        training read, unless the template writes the prompt otherwise before an answer (a system turn it
        drops, the day it writes): conversations are rendered as training rendered them. Another project's model
        (`foreign`) is given a text prompt and completion joined as they are, as TRL's GRPO gives them."""
        closing = templates.turn_closing(self.template, self.tokenizer)
        opening = templates.turn_opening(self.template, self.tokenizer)
        tail = templates.generation_tail(self.template, self.tokenizer)

        def joined(prompt: Any, completion: Any) -> Any:
            if not isinstance(completion, str):
                return prompt + completion
            # closed already, or by its end token alone (a policy whose end token is chatml's <|im_end|>)
            done = next((part for part in (closing, closing.rstrip()) if part and completion.endswith(part)), "")
            unclosed = completion[:len(completion) - len(done)]
            # given opened: the template opens it
            answer = unclosed[len(opening):] if opening and unclosed.startswith(opening) else unclosed
            text = templates.answer_text(answer, self.template, self.tokenizer, tail)
            # a template that refuses a lone exchange, or a prompt rendered without the generation prompt's
            # tail: joined as given, closed
            if text is None or not prompt.endswith(tail):
                return prompt + unclosed + closing
            prompt = prompt[:len(prompt) - len(tail)]  # the answer follows it: rendered with the answer
            if opening.strip() and prompt.endswith(opening) and text.startswith(opening):
                text = text[len(opening):]  # a prompt rendered with the opening (Qwen3's thinking off)
            return prompt + text

        def reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
            if len(prompts) != len(completions):
                raise DataError(f"reward function: {len(prompts)} prompts but {len(completions)} completions")
            names = [f"item {i}" for i in range(len(prompts))]
            for p, c, name in zip(prompts, completions, names):
                if isinstance(p, str) != isinstance(c, str):
                    raise DataError(f"reward function: {name}: a {_kind(p)} prompt with a {_kind(c)} completion; "
                                    "give both as text or both as conversations (lists of messages)")
                if isinstance(c, list) and not c:  # the prompt alone would be scored as if answered
                    raise DataError(f"reward function: {name}: the completion is an empty conversation (no "
                                    "message)")
            encoded = [self.as_given(p + c, name) if self.foreign and isinstance(p, str) else
                       self.encode(joined(p, c), name) for p, c, name in zip(prompts, completions, names)]
            lengths = ([self.given_prompt_length(p, name) for p, name in zip(prompts, names)]
                       if self.max_prompt is not None else None)
            return self.score_ids(encoded, names, lengths).rewards

        reward.__name__ = f"reward_model_{self.model_dir.name}"
        return reward


def _prompt_of(conversation: list[dict]) -> list[dict]:
    """The messages before a conversation's closing assistant turns (all of it where it ends otherwise: then
    no answer is known, and nothing is taken for its prompt)."""
    end = len(conversation)
    while end and isinstance(conversation[end - 1], dict) and conversation[end - 1].get("role") == "assistant":
        end -= 1
    return conversation[:end] if end < len(conversation) else []


def _normalisation(config: Any, model_dir: Path) -> tuple[float, float]:
    """(mean, std) of the rewards of the model's training pairs, as train saved them in config.json
    (reward_mean, reward_std: up to 1,000 training pairs, both sides). A model without them (another
    project's, or one an earlier version saved) or whose rewards had no spread cannot be normalised:
    refused, where raw rewards were returned as if normalised."""
    mean, std = getattr(config, "reward_mean", None), getattr(config, "reward_std", None)
    if mean is None or std is None:
        raise SettingsError(f"normalize: {model_dir / 'config.json'} holds no reward_mean and reward_std (a model "
                            "this project's train did not save, or an earlier version did): score it with "
                            "normalize=False")
    try:  # an int past a float's range (1 and 400 zeros) reads from JSON too
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
                      for v in (mean, std))
    except OverflowError:
        numbers = False
    if not numbers:
        raise SettingsError(f"normalize: {model_dir / 'config.json'} holds reward_mean {shown_value(mean)} and "
                            f"reward_std {shown_value(std)}, which are not both numbers (a damaged or hand-edited "
                            "file): score it with normalize=False")
    if not std > 1e-12:  # a subnormal one (5e-324) turned every normalised reward into inf
        raise SettingsError(f"normalize: {model_dir}'s rewards had no spread in training (reward_std {std} in its "
                            "config.json): normalising would divide by it; score it with normalize=False")
    return float(mean), float(std)


def _whole(value: Any) -> int | None:
    """An int from any whole-number type (numpy's too), or None; not a bool."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _device(device: str | torch.device | None) -> torch.device:
    """The device to score on: as asked, where torch has it; by default a GPU where there is one."""
    try:
        chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as exc:
        raise SettingsError(f"device: {device!r} is no torch device ({exc})") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"device: {device!r} asked for, but this torch has no CUDA device (torch "
                            f"{torch.__version__}); use device='cpu', or install a CUDA build of torch")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise SettingsError(f"device: {device!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    return chosen


def check_model_folder(model: str | Path, name: str) -> None:
    """A local model path that is a folder holding a model, or a SettingsError naming `name`: the
    libraries would read a missing folder as a malformed Hub id, an adapter's folder or an empty one as a
    tokenizer that cannot be built. A Hub id passes (it is read from the Hub)."""
    folder = Path(model).expanduser()
    if not folder.exists():
        if isinstance(model, Path) or names_a_folder(str(model)):
            raise SettingsError(f"{name} {model}: no such folder")
        return
    if not folder.is_dir():
        raise SettingsError(f"{name} {model}: is a file; name the folder train wrote (models/reward_model) or a "
                            "Hub id")
    if not (folder / "config.json").is_file():
        raise SettingsError(f"{name} {model}: the folder holds no model (no config.json); "
                            + (adapter_advice(folder) or "name the folder train wrote (models/reward_model)"))


def check_tokenizer_as_trained(model: str, tokenizer: Any, special: SpecialTokens, saved: dict,
                               template: str | None = None) -> None:
    """The tokenizer puts the start and end tokens around a text that training put (rm_lib.json records
    them), and has the chat template training rendered with: a file of the tokenizer lost or replaced
    (tokenizer_config.json names the EOS) would move the token the reward is read at, and every reward
    with it, unsaid. A model saved before rm_lib.json recorded them, or another project's, is not
    judged (its config's eos_token_id is often a default its tokenizer never adds). `template`: the one
    asked for (None: the recorded one)."""
    recorded = saved.get("special_tokens")
    files = "tokenizer_config.json, tokenizer.json"
    if isinstance(recorded, dict):
        wanted = SpecialTokens(prefix=tuple(recorded.get("prefix") or ()), end=recorded.get("end"))
        if (special.prefix, special.end) != (wanted.prefix, wanted.end):
            raise SettingsError(
                f"{model}: its tokenizer puts {list(special.prefix)} before a text and ends it with {special.end}, "
                f"where training put {list(wanted.prefix)} and {wanted.end} (rm_lib.json): a file of the tokenizer "
                f"({files}) is missing or not the one it trained with, and the rewards would be read at another "
                "token; copy the folder train wrote again")
    if saved.get("template") == "tokenizer" and template in (None, "auto", "tokenizer") \
            and not getattr(tokenizer, "chat_template", None):
        raise SettingsError(
            f"{model}: trained on conversations rendered with its tokenizer's chat template (rm_lib.json), which "
            "the folder no longer holds (chat_template.jinja, or chat_template in tokenizer_config.json); copy "
            "the folder train wrote again")


def _kind(part: Any) -> str:
    return "text" if isinstance(part, str) else "conversation" if isinstance(part, list) else type(part).__name__
