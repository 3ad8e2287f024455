"""What a run of steps checks before its first step replaces anything: the settings only the base model
or the files they name can judge. The CLI (`run`, or one step) and a Dagster run of any assets share it,
so a mistake in train's settings stops a run before download replaces data/pairs, on every front-end."""
from __future__ import annotations

from collections.abc import Collection

from rm_lib.errors import DataError, SettingsError
from rm_lib.settings import Params

# accelerate trains fp16 on a CPU as plain fp32 without a word, while the records would say fp16
FP16_ON_CPU = ("train.mixed_precision: fp16 needs a GPU; on a CPU accelerate trains in fp32 while the records would "
               "say fp16. Use 'bf16' (fast on CPUs with AMX) or 'no'")


def check_before(steps: Collection[str], params: Params) -> None:
    """A SettingsError for a mistake that one of `steps` would otherwise meet only once it runs: a model
    that cannot be a one-output reward model (its config, and its weights where train is among them), a
    max_token_length past what the model reads, LoRA targets that match no module, an evaluation suite
    naming a file that is not there, fp16 training without a GPU, a push to the Hub in offline mode. Each
    step checks its own settings
    again when it runs; a step run alone is not checked here for what it checks itself at once (filter's
    length, evaluate's suites).
    Reads config.json and the tokenizer, never the weights."""
    steps = set(steps)
    alone = len(steps) == 1
    length = "filter" in steps and not alone
    if steps & {"tokenize", "train"} or length:
        from rm_lib.model.modeling import check_attention, check_lora_targets, check_max_token_length, load_model_config

        model = params.model
        config = load_model_config(model.name_or_path, revision=model.revision,
                                   trust_remote_code=model.trust_remote_code,
                                   weights="train" in steps)  # tokenize reads the config and tokenizer alone
        if length:
            check_max_token_length(params.filter.max_token_length, model.name_or_path, revision=model.revision,
                                   trust_remote_code=model.trust_remote_code)
        if "train" in steps and params.train.lora:
            check_lora_targets(config, params.train.lora_target_modules, trust_remote_code=model.trust_remote_code)
        if "train" in steps and params.train.attention in ("sdpa", "eager", "flex_attention"):
            check_attention(config, params.train.attention, trust_remote_code=model.trust_remote_code)
    if "train" in steps and not alone and params.train.mixed_precision == "fp16":
        import torch

        if not torch.accelerator.is_available():  # accelerate trains fp16 on any accelerator: CUDA, MPS, XPU
            raise SettingsError(FP16_ON_CPU)
    if "push" in steps and not alone and params.push.repo_id and not params.push.dry_run:
        from rm_lib import network

        if network.hub_offline():  # the push at the end would fail after the training
            raise SettingsError(f"push.repo_id is set, but {network.OFFLINE_ADVICE}; or set push.dry_run=true to "
                                "only write the release")
    if "evaluate" in steps and not alone and params.evaluate.suites:
        from rm_lib.evaluation.suites import parse_entries

        try:
            parse_entries(params.evaluate.suites)  # a local file must be there; a Hub name is read at evaluate
        except DataError as exc:
            raise SettingsError(f"evaluate.suites: {exc}") from None
