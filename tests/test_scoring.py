import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rm_lib.evaluation.scoring import RewardScorer
from rm_lib.layout import Layout

from helpers import run_steps, tiny_params, write_jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("scored")
    run_steps(tiny_params("train.max_steps=2"), root, "download", "tokenize", "filter", "train")
    return root


def test_score_api_pipeline_and_grpo_reward_function_agree(trained):
    from transformers import pipeline

    scorer = RewardScorer(trained / "models/reward_model")
    conversation = [{"role": "user", "content": "Tell me about the film."},
                    {"role": "assistant", "content": "The acting was wonderful."}]
    text = "User: Tell me about the film.\n\nAssistant: The acting was wonderful."
    by_messages, by_text = scorer.score([conversation, text])
    assert by_messages == pytest.approx(by_text, abs=1e-5)
    pipe = pipeline("text-classification", model=str(trained / "models/reward_model"), function_to_apply="none")
    assert pipe(text)[0]["score"] == pytest.approx(by_text, abs=1e-4)
    reward = scorer.reward_function()
    assert reward(prompts=[conversation[:1]], completions=[conversation[1:]]) == pytest.approx([by_messages], abs=1e-5)


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_trls_grpo_and_rloo_trainers_take_the_reward_function_for_a_real_step(trained, tiny_decoder, tmp_path, trainer):
    """The card's TRL recipe in the trainers themselves: a step of TRL's GRPO or RLOO, the policy a tiny
    decoder, calls the function with conversations it generated; each reward is the scorer's for them."""
    import warnings

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    scorer = RewardScorer(trained / "models/reward_model")
    reward, calls = scorer.reward_function(), []

    def recorded(prompts, completions, **kwargs):
        given = reward(prompts, completions, **kwargs)
        calls.append((prompts, completions, given))
        return given

    recorded.__name__ = reward.__name__
    prompts = [[{"role": "user", "content": "how was the film ?"}], [{"role": "user", "content": "hi"}]]
    Trainer, Config = {"grpo": (GRPOTrainer, GRPOConfig), "rloo": (RLOOTrainer, RLOOConfig)}[trainer]
    args = Config(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=2,
                  num_generations=2, max_completion_length=6, max_steps=1, save_strategy="no", logging_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=str(tiny_decoder), reward_funcs=recorded, args=args,
                train_dataset=Dataset.from_dict({"prompt": prompts})).train()
    assert calls, "the trainer never called the reward function"
    for given_prompts, completions, given in calls:
        assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions)  # conversational
        assert given == pytest.approx(scorer.score([p + c for p, c in zip(given_prompts, completions)]), abs=1e-5)


@pytest.fixture(scope="module")
def trained_own_template(tmp_path_factory, tiny_decoder):
    """The tiny decoder trained on conversations its own chat template renders (its BOS, no EOS; pad == EOS)."""
    root = tmp_path_factory.mktemp("scored-own-template")
    run_steps(tiny_params("train.max_steps=2", model=str(tiny_decoder)), root,
              "download", "tokenize", "filter", "train")
    return root / "models/reward_model"


def test_grpo_given_the_models_name_reads_the_rewards_training_measured(trained_own_template, tiny_decoder, tmp_path):
    """GRPO given the model folder's name (`reward_funcs="<repo>"`) renders a conversation with the saved chat
    template and tokenizes its text with no special tokens: the template wrote no EOS, so it read every reward
    one token early (a mean of 0.03 where training's reward gave 0.11 here). A conversation longer than
    training read is cut by the card's recipe as the scorer cuts it."""
    import warnings

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rm_lib.publish import model_card

    release = trained_own_template
    assert json.loads((release / "rm_lib.json").read_text())["template"] == "tokenizer"
    scorer = RewardScorer(release)
    reward = scorer.reward_function()

    def scored(prompts, completions, **kwargs):
        return reward(prompts, completions, **kwargs)

    prompts = [[{"role": "user", "content": "how was the film ?"}], [{"role": "user", "content": "hi"}],
               [{"role": "system", "content": "be brief"}, {"role": "user", "content": "and the plot ?"}]]
    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=6,
                      num_generations=2, max_completion_length=6, max_steps=1, save_strategy="no", logging_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=str(tiny_decoder), reward_funcs=[str(release), scored], args=args,
                              train_dataset=Dataset.from_dict({"prompt": prompts}))
        trainer.train()
    logged = trainer.state.log_history[0]
    for kind in ("mean", "std"):  # GRPO logs the model's rewards rounded to bfloat16
        assert logged[f"rewards/reward_model/{kind}"] == pytest.approx(logged[f"rewards/scored/{kind}"], abs=2e-3)
    tokenizer = AutoTokenizer.from_pretrained(release)
    model = AutoModelForSequenceClassification.from_pretrained(release).eval()
    usage = model_card._usage("me/rm", tokenizer=model_card.tokenizer_facts(release), max_length=scorer.max_length)
    assert "read training's reward for a conversation within the 64 tokens training read (they" in usage
    # under filter.policy=truncate training cut a long prompt too: the card says so where it cuts
    assert model_card._held_to({"max_token_length": 64, "max_prompt_token_length": 32, "policy": "drop"}) == (64, None)
    cut_too = model_card._usage("me/rm", tokenizer=model_card.tokenizer_facts(release), max_length=64, max_prompt=32)
    assert "within the 64 tokens training read, its prompt within the 32 it held prompts to (they" in cut_too
    assert "# a prompt over 32 tokens: training cut it too, as the scoring API below does" in cut_too
    cut = next(line for line in usage.splitlines() if line.startswith("ids = ids["))
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good film " * 60}]
    scope = {"ids": tokenizer.apply_chat_template(long, tokenize=True)["input_ids"]}
    exec(cut, scope)  # noqa: S102 - the card's own line
    assert len(scope["ids"]) == 64
    with torch.no_grad():
        card = model(input_ids=torch.tensor([scope["ids"]])).logits[0, 0].item()
    assert card == pytest.approx(scorer.score([long])[0], abs=1e-5)


def test_grpos_text_prompts_rendered_with_the_training_template_get_the_conversations_reward(tmp_path):
    """In TRL's text format a completion comes without the policy's end token, and the prompt as the dataset
    holds it (the card: rendered with the training template). Joined as given, a chatml model read the answer
    without the `<|im_end|>` training's texts end with: another reward than the same conversation's."""
    import shutil

    from rm_lib.data import templates
    from rm_lib.model.modeling import load_reward_model, load_tokenizer, save_model

    tok = load_tokenizer("default")
    save_model(load_reward_model("default", pad_token_id=tok.pad_token_id), tok, tmp_path / "chatml")
    shutil.copytree(tmp_path / "chatml", tmp_path / "simple_chat")
    shutil.copytree(tmp_path / "chatml", tmp_path / "simple_concat")
    # a prompt that ends in a word: simple_concat's generation prompt stops before the line break its
    # answer opens with, and a completion joined without it ran into the prompt ("eggPut"): another reward
    prompt = [{"role": "user", "content": "How do I boil an egg"}]
    answer = "Put it in boiling water for eight minutes."
    for template, between, closing in (("chatml", "", "<|im_end|>\n"), ("simple_chat", " ", ""),
                                       ("simple_concat", "\n", "")):
        folder = tmp_path / template
        (folder / "rm_lib.json").write_text(json.dumps({"template": template}))
        scorer = RewardScorer(folder)
        [expected] = scorer.score([prompt + [{"role": "assistant", "content": answer}]])
        text_prompt = templates.render(prompt, template, tok, add_generation_prompt=True)
        reward = scorer.reward_function()
        # closed once, whether it came closed, or by the end token alone (a policy ending in <|im_end|>)
        endings = ("", closing, closing.rstrip())
        given = reward(prompts=[text_prompt] * 4, completions=[between + answer + end for end in endings] + [answer])
        assert given == pytest.approx([expected] * 4, abs=1e-5), template  # opened as training's, or given opened


# A chat template that rewrites an answer's think block and writes an empty one before an answer without
# (as Qwen3's does), and writes one into the generation prompt when thinking is off.
THINKING_TEMPLATE = r"""{%- for m in messages -%}
{%- if m.role == 'assistant' -%}
{%- set content = m.content -%}{%- set reasoning = '' -%}
{%- if '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
{{ '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content + '<|im_end|>\n' }}
{%- else -%}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\n\n</think>\n\n' }}{%- endif -%}
{%- endif -%}"""


def test_a_text_completion_is_rendered_as_the_training_template_renders_an_answer(tmp_path):
    """A template's opening added in front of a completion that brings its own think block wrote the empty
    block twice; a simple_concat prompt ending in a line break lost the one its answer opens with."""
    from rm_lib.data import templates
    from rm_lib.model.modeling import load_reward_model, load_tokenizer, save_model

    tok = load_tokenizer("default")
    tok.chat_template = THINKING_TEMPLATE
    save_model(load_reward_model("default", pad_token_id=tok.pad_token_id), tok, tmp_path / "thinking",
               chat_template=True)
    (tmp_path / "thinking" / "rm_lib.json").write_text(json.dumps({"template": "tokenizer"}))
    scorer = RewardScorer(tmp_path / "thinking")
    reward = scorer.reward_function()
    prompt = [{"role": "user", "content": "What is two plus two"}]
    thought, plain = "<think>\nit is a simple sum\n</think>\n\nfour", "four"
    expected = scorer.score([prompt + [{"role": "assistant", "content": a}] for a in (thought, plain)])
    assert expected[0] != pytest.approx(expected[1], abs=1e-6)
    text_prompt = templates.render(prompt, "tokenizer", scorer.tokenizer, add_generation_prompt=True)
    assert reward([text_prompt] * 2, [thought, plain]) == pytest.approx(expected, abs=1e-5)
    thinking_off = scorer.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                                        enable_thinking=False)
    assert thinking_off.endswith("<think>\n\n</think>\n\n")
    assert reward([thinking_off], [plain]) == pytest.approx(expected[1:], abs=1e-5)
    # simple_concat: the line break between prompt and answer stays where the prompt ends in one
    (tmp_path / "thinking" / "rm_lib.json").write_text(json.dumps({"template": "simple_concat"}))
    scorer = RewardScorer(tmp_path / "thinking", template="simple_concat")
    prompt = [{"role": "user", "content": "Translate to French\n"}]
    [expected] = scorer.score([prompt + [{"role": "assistant", "content": "Bonjour"}]])
    text_prompt = templates.render(prompt, "simple_concat", scorer.tokenizer, add_generation_prompt=True)
    assert scorer.reward_function()([text_prompt], ["Bonjour"]) == pytest.approx([expected], abs=1e-5)


# DeepSeek-R1's shape: the generation prompt opens a think block, and every answer it renders loses what
# comes before its </think>.
OPENS_THINKING = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}"
                  "{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
                  "Assistant: {{ c }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: <think>\n"
                  "{% endif %}")


def test_a_text_completion_after_a_generation_prompt_that_opens_a_think_block_is_rendered_as_training_read_it(
        tmp_path):
    """The policy writes on after the generation prompt's <think>: its completion was scored joined to the
    prompt as given (the think block and all), a text training never read, since the template drops it."""
    from rm_lib.data import templates
    from rm_lib.model.modeling import load_reward_model, load_tokenizer, save_model

    tok = load_tokenizer("default")
    tok.chat_template = OPENS_THINKING
    save_model(load_reward_model("default", pad_token_id=tok.pad_token_id), tok, tmp_path / "r1", chat_template=True)
    (tmp_path / "r1" / "rm_lib.json").write_text(json.dumps({"template": "tokenizer"}))
    scorer = RewardScorer(tmp_path / "r1")
    assert templates.generation_tail("tokenizer", scorer.tokenizer) == "<think>\n"
    prompt = [{"role": "user", "content": "What is two plus two"}]
    completions = ["it is a simple sum\n</think>\n\nfour", "four"]  # the second never closed its thinking
    expected = scorer.score([prompt + [{"role": "assistant", "content": "<think>\n" + c}] for c in completions])
    text_prompt = templates.render(prompt, "tokenizer", scorer.tokenizer, add_generation_prompt=True)
    assert text_prompt.endswith("Assistant: <think>\n")
    assert scorer.reward_function()([text_prompt] * 2, completions) == pytest.approx(expected, abs=1e-5)


def test_score_goes_on_in_halves_when_a_batch_runs_out_of_gpu_memory(trained, monkeypatch, capsys):
    import torch

    from rm_lib.evaluation import scoring

    texts = [f"User: question {i}?\n\nAssistant: answer number {i}." for i in range(7)]
    roomy = RewardScorer(trained / "models/reward_model", batch_size=4).score(texts)
    real = scoring.rewards

    def scarce(model, input_ids, *args, **kwargs):
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(scoring, "rewards", scarce)
    assert RewardScorer(trained / "models/reward_model", batch_size=4).score(texts) == pytest.approx(roomy, abs=1e-5)
    assert "score: out of GPU memory in a batch of 4 texts; on in batches of 2" in capsys.readouterr().err


def test_score_cli_writes_rewards_per_row(trained, tmp_path):
    rows = [{"prompt": "The film was", "chosen": "wonderful and brilliant.", "rejected": "awful and dreadful.",
             "id": "review-17"},
            {"prompt": "The film was", "chosen": "same", "rejected": "same"},
            {"prompt": "The film was", "chosen": "Good.", "rejected": "good.", "id": "case-3"}]  # uncased: one ids
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(trained), "score", "--input", str(src),
                          "--output", str(tmp_path / "scores.jsonl")], capture_output=True, text=True, check=True)
    assert "1 pairs (2 rejected: identical 1, identical_tokens 1; 0 truncated to 64 tokens), accuracy" in out.stdout
    assert "longer wins" in out.stdout
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(scored) == 1 and {"reward_chosen", "reward_rejected", "chosen_wins"} <= set(scored[0])
    assert (scored[0]["id"], scored[0]["source"]) == ("review-17", f"{src}:1")  # the input's own id, and where it is
    # the row set aside is written beside the output, with its reason and its data: nothing lost
    assert f"rows set aside: {tmp_path / 'scores.jsonl.rejects.jsonl'}" in out.stdout
    read, tie = [json.loads(line) for line in (tmp_path / "scores.jsonl.rejects.jsonl").read_text().splitlines()]
    assert (read["row"], read["reason"], read["data"]) == (2, "identical", rows[1])
    assert (tie["file"], tie["row"], tie["reason"]) == (str(src), 3, "identical_tokens")
    # one shape of row whoever set it aside (the reader, the tie check): a script reads them alike
    assert set(read) == set(tie) == {"id", "source", "file", "row", "reason", "detail", "data"}
    assert (read["id"], read["source"], tie["id"], tie["source"]) == (f"{src}:2", f"{src}:2", "case-3", f"{src}:3")


def test_score_reads_pretokenized_ids_as_given_and_sets_aside_sides_that_tokenize_alike(trained, tmp_path):
    """Ids that are not the tokenizer's own split (`play ##ing`) are scored as given, as tokenize passes
    them to training and evaluation: decoding and encoding them again would score other ids. Texts whose
    sides give the same ids (the model's tokenizer is uncased) are set aside as identical_tokens."""
    import torch

    from rm_lib.cli import main
    from rm_lib.model.modeling import load_reward_model, load_tokenizer, rewards

    model_dir = trained / "models/reward_model"
    tok = load_tokenizer(str(model_dir))
    prompt = tok("the movie was", add_special_tokens=False)["input_ids"]
    chosen = prompt + tok.convert_tokens_to_ids(["play", "##ing", "is", "good"])
    rejected = prompt + tok.convert_tokens_to_ids(["un", "##able", "to", "say"])
    assert tok(tok.decode(chosen), add_special_tokens=False)["input_ids"] != chosen  # encoding again differs
    src = write_jsonl(tmp_path / "pairs.jsonl", [{"input_ids_chosen": chosen, "input_ids_rejected": rejected}])
    assert main(["--root", str(trained), "score", "--input", str(src), "--output", str(tmp_path / "s.jsonl")]) == 0
    (scored,) = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    model = load_reward_model(str(model_dir)).eval()
    with torch.no_grad():
        for side, ids in (("chosen", chosen), ("rejected", rejected)):
            row = torch.tensor([[tok.cls_token_id, *ids, tok.sep_token_id]])
            direct = rewards(model, row, torch.ones_like(row)).item()
            assert scored[f"reward_{side}"] == pytest.approx(direct, abs=1e-5), side

    texts = [{"prompt": "The film was", "chosen": "Good.", "rejected": "good."},
             {"prompt": "The film was", "chosen": "good.", "rejected": "bad."}]
    src = write_jsonl(tmp_path / "texts.jsonl", texts)
    assert main(["--root", str(trained), "score", "--input", str(src), "--output", str(tmp_path / "t.jsonl")]) == 0
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 1
    (aside,) = [json.loads(line) for line in (tmp_path / "t.jsonl.rejects.jsonl").read_text().splitlines()]
    assert aside["reason"] == "identical_tokens" and aside["data"]["chosen"][0]["content"] == "Good."


@pytest.mark.parametrize("case, message", [
    ("output is the input", "is the input file; the rewards would replace the pairs"),
    ("output is a folder", "is a folder; name the JSON Lines file to write"),
    ("the input is where the rows set aside go", "which is the input file; name another output"),
    ("the input is where a failed run's rows go", "which is the input file; name another output"),
    ("where the rows set aside go is a folder", "which is a folder"),
    ("output is a named pipe", "is a named pipe (FIFO); score writes its rewards"),
    ("output is a link to a named pipe", "is a named pipe (FIFO) (the link's target"),
    ("output is a link into /proc", "is a link to the system path /proc/self/fd/1; score writes"),
    ("every row set aside", "no pair to score: all 2 rows were set aside (identical: 2); see"),
    ("a token id past the vocabulary", "field 'input_ids_chosen': token id 999999 is outside the model's "
                                       "vocabulary"),
    ("a best-of-N CSV file", "row 2, field 'chosen': chosen and rejected are lists of answers (RewardBench 2's"),
    ("output inside the model scored", "model.safetensors is inside"),  # its weights became the rewards
    ("output inside a step's folder", "is inside"),
])
def test_score_refuses_what_would_lose_data_or_crash_in_one_line(trained, tmp_path, capsys, case, message):
    from rm_lib.cli import main

    rows = [{"prompt": "The film was", "chosen": "fine.", "rejected": "bad."}]
    output = tmp_path / "scores.jsonl"
    if case == "output is the input":
        output = write_jsonl(tmp_path / "pairs.jsonl", rows)
    elif case == "output is a folder":
        output.mkdir()
    elif case == "the input is where the rows set aside go":  # the rejects replaced it, or a clean run deleted it
        src = write_jsonl(tmp_path / "scores.jsonl.rejects.jsonl", rows)
    elif case == "the input is where a failed run's rows go":
        src = write_jsonl(tmp_path / "scores.jsonl.failed.rejects.jsonl", rows)
    elif case == "where the rows set aside go is a folder":
        (tmp_path / "scores.jsonl.rejects.jsonl").mkdir()
    elif case == "output is a named pipe":  # replaced by a file, its reader left waiting for ever
        os.mkfifo(output)
    elif case == "output is a link to a named pipe":
        os.mkfifo(tmp_path / "fifo")
        output.symlink_to(tmp_path / "fifo")
    elif case == "output is a link into /proc":  # as /dev/stdout is: as root, that link became a file
        output.symlink_to("/proc/self/fd/1")
    elif case == "every row set aside":
        rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}] * 2
    elif case == "a best-of-N CSV file":  # each cell a list's repr, as pandas writes it: read as the list
        src = tmp_path / "rb2.csv"
        src.write_text("prompt,chosen,rejected\np,['fine.'],\"['bad.', 'worse.']\"\n")
    elif case == "output inside the model scored":
        output = Layout(trained).model / "model.safetensors"
    elif case == "output inside a step's folder":
        output = Layout(trained).evaluation / "scores.jsonl"
    else:
        rows = [{"input_ids_chosen": [1, 999_999], "input_ids_rejected": [1, 2]}]
    if not case.startswith(("the input is", "a best-of-N")):
        src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    before = src.read_bytes()
    code = main(["--root", str(trained), "score", "--input", str(src), "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and message in err.strip().splitlines()[-1]
    assert src.read_bytes() == before
    if case == "output inside the model scored":
        assert "the model it scores" in err
    if case == "output inside a step's folder":
        assert "a folder the evaluate step writes" in err and not output.exists()
    if case == "output is a named pipe":
        assert stat.S_ISFIFO(os.lstat(output).st_mode)  # not replaced by a file
    elif "link" in case:
        assert output.is_symlink()


def test_outputs_in_scratch_folders_under_dev_are_no_system_paths(tmp_path):
    """/dev/shm is a tmpfs many clusters and containers write scratch files to: only links through /dev or
    /proc (as /dev/stdout is), pipes, devices and sockets are refused."""
    from rm_lib.files import special_file

    assert special_file("/dev/shm/scores.jsonl") is None and special_file("/proc/x.jsonl") is None
    (tmp_path / "file.jsonl").write_text("")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "file.jsonl")
    assert special_file(tmp_path / "link.jsonl") is None and special_file(tmp_path / "missing.jsonl") is None
    (tmp_path / "out").symlink_to("/dev/stdout")
    assert special_file(tmp_path / "out") == "a link to the system path /dev/stdout"
    assert special_file("/dev/null") == "a character device"


def test_weights_the_user_may_not_read_are_named_so(trained, tmp_path):
    """Another user's model.safetensors (mode 0600) was "No such file or directory". The error names the
    option that chose the model (it named model.name_or_path, a setting score does not read)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(trained / "models/reward_model", model)
    (model / "model.safetensors").chmod(0)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "The film was", "chosen": "fine.", "rejected": "bad."}])
    command = [sys.executable, "-m", "rm_lib", "--root", str(trained), "score", "--model", str(model), "--input",
               str(pairs), "--output", str(tmp_path / "out.jsonl")]
    if os.geteuid() == 0:  # root reads any file: without that power, as a user would
        if shutil.which("setpriv") is None:
            pytest.skip("needs util-linux's setpriv to run without root's permission override")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", *command]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"error: --model: cannot read the weights of '{model}' "
                                                    f"({model / 'model.safetensors'}: Permission denied)")


def test_a_damaged_trained_model_is_named_as_the_trained_model_not_a_setting(trained, tmp_path):
    """evaluate and score (without --model) read the model train wrote: an error about it named
    model.name_or_path, the base model's setting, which no edit of could mend it."""
    import shutil

    from rm_lib.errors import SettingsError
    from rm_lib.steps.evaluate import evaluate_folder

    model = tmp_path / "model"
    shutil.copytree(trained / "models/reward_model", model)
    (model / "model.safetensors").unlink()
    with pytest.raises(SettingsError, match=f"^the trained model: '{re.escape(str(model))}' has no safetensors"):
        evaluate_folder(model, [], batch_size=2, buckets=2)


def test_a_token_id_past_the_vocabulary_names_its_own_file_and_row(trained, tmp_path, capsys):
    """The row was counted among the pairs kept, after the rows set aside, and the file was the folder given."""
    from rm_lib.cli import main

    write_jsonl(tmp_path / "pretok" / "a.jsonl", [{"input_ids_chosen": [5, 6], "input_ids_rejected": [5, 7]}])
    b = write_jsonl(tmp_path / "pretok" / "b.jsonl", [{"input_ids_chosen": [5, 6], "input_ids_rejected": [5, 6]},
                                                      {"input_ids_chosen": [5, 6], "input_ids_rejected": [5, 999_999]}])
    argv = ["--root", str(trained), "score", "--input", str(tmp_path / "pretok"), "--output", str(tmp_path / "o.jsonl")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: file {b}, row 2, field 'input_ids_rejected': token id 999999 is outside the model's vocabulary")


LONG = "User: Tell me everything about the film.\n\nAssistant: " + "The acting was wonderful and brilliant. " * 120


def test_a_text_longer_than_the_model_positions_is_truncated_keeping_the_end(trained):
    from rm_lib.data.length_filter import truncate_left

    # the positions (512) when asked; by default the 64 tokens its training pairs were held to (below)
    scorer = RewardScorer(trained / "models/reward_model", max_length=512)
    assert scorer.max_length == 512 and len(scorer.encode(LONG)) > 512
    assert RewardScorer(trained / "models/reward_model").max_length == 64  # as score and evaluate hold its pairs
    scored = scorer.score_detailed([LONG, "User: hi\n\nAssistant: hello"])
    assert scored.truncated == [True, False]
    assert scored.lengths[0] == len(scorer.encode(LONG))
    kept = truncate_left(scorer.encode(LONG), 512, len(scorer.special.prefix))
    assert kept[0] == scorer.encode(LONG)[0] and kept[-10:] == scorer.encode(LONG)[-10:]
    import torch

    from rm_lib.model.modeling import rewards

    ids = torch.tensor([kept])
    expected = rewards(scorer.model, ids, torch.ones_like(ids)).item()
    assert scored.rewards[0] == pytest.approx(expected, abs=1e-5)
    assert scorer.score([LONG]) == pytest.approx([expected], abs=1e-5)


def test_with_policy_drop_a_long_text_is_refused_naming_it(trained):
    from rm_lib.errors import DataError

    scorer = RewardScorer(trained / "models/reward_model", length_policy="drop")
    with pytest.raises(DataError, match=r"item 1: \d+ tokens, more than the 64 the model reads; use "
                                        r"length_policy='truncate'"):  # the argument this caller set, not the CLI's
        scorer.score(["User: hi\n\nAssistant: hello", LONG])


def test_score_cli_truncates_long_pairs_and_says_how_many(trained, tmp_path, capsys):
    from rm_lib.cli import main

    rows = [{"prompt": "The film was", "chosen": "wonderful and brilliant.", "rejected": "awful and dreadful."},
            {"prompt": LONG, "chosen": " Truly wonderful.", "rejected": " Truly awful."},
            # they differ only in what the cut takes away: a sure tie, set aside as filter sets it aside
            {"prompt": "", "chosen": "Alpha. " + LONG, "rejected": "Beta. " + LONG, "id": 7}]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "scores.jsonl"
    argv = ["--root", str(trained), "score", "--input", str(src), "--output", str(out)]
    # held to the 64 tokens the model was trained with (tiny_params), as filter held its test pairs
    assert main(argv + ["--set", "filter.policy=truncate"]) == 0
    assert "2 pairs (1 rejected: identical_after_truncation 1; 1 truncated to 64 tokens)" in capsys.readouterr().out
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["truncated"] for r in scored] == [False, True]
    (aside,) = [json.loads(line) for line in (tmp_path / "scores.jsonl.rejects.jsonl").read_text().splitlines()]
    assert aside["reason"] == "identical_after_truncation" and (aside["id"], aside["source"]) == (7, f"{src}:3")
    assert [(r["id"], r["source"]) for r in scored] == [(f"{src}:{i}", f"{src}:{i}") for i in (1, 2)]  # no id of theirs
    # under drop a long pair is set aside as filter sets it aside from evaluation: counted, with its lengths
    assert main(argv + ["--set", "filter.policy=drop"]) == 0
    assert "(2 rejected: both_too_long 1, prompt_too_long 1; 0 truncated to 64 tokens)" in capsys.readouterr().out
    aside = [json.loads(line) for line in (tmp_path / "scores.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in aside] == [(f"{src}:2", "prompt_too_long"),
                                                           (f"{src}:3", "both_too_long")]
    assert "over the model's prompt limit of 32" in aside[0]["detail"] and aside[0]["data"]["chosen"]


def test_a_pair_the_model_scores_alike_is_no_win_for_the_chosen_side(trained, tmp_path, monkeypatch, capsys):
    """A tie is a wrong answer in `score` as in evaluate: `chosen_wins` false, not counted as accurate."""
    import torch

    from rm_lib.cli import main
    from rm_lib.evaluation import scoring

    monkeypatch.setattr(scoring, "rewards", lambda model, input_ids, *args, **kwargs:
                        torch.zeros(input_ids.shape[0]))  # a model that cannot tell the sides apart
    rows = [{"prompt": "The film was", "chosen": "wonderful and brilliant.", "rejected": "awful and dreadful."},
            {"prompt": "The plot was", "chosen": "tight.", "rejected": "loose."}]
    out = tmp_path / "scores.jsonl"
    assert main(["--root", str(trained), "score", "--input", str(write_jsonl(tmp_path / "pairs.jsonl", rows)),
                 "--output", str(out)]) == 0
    assert [json.loads(line)["chosen_wins"] for line in out.read_text().splitlines()] == [False, False]
    assert "accuracy 0.0000" in capsys.readouterr().out


def test_a_model_without_recorded_lengths_scores_up_to_its_positions_whatever_params_yaml_says(trained, tmp_path):
    """A Hub model, or one an earlier version saved: nothing says what its pairs were held to, so it reads
    up to its positions with no prompt limit; this project's filter settings (its params.yaml) are not
    its (they set aside pairs it reads)."""
    import shutil

    from rm_lib.layout import Layout
    from rm_lib.settings import load_params
    from rm_lib.steps import score

    other = Path(shutil.copytree(trained / "models/reward_model", tmp_path / "other"))
    saved = json.loads((other / "rm_lib.json").read_text())
    assert saved["lengths"] == {"max_token_length": 64, "max_prompt_token_length": 32, "policy": "drop"}  # train's
    (other / "rm_lib.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "lengths"}))
    prompt = "The acting was wonderful and brilliant. " * 60  # over 384 prompt tokens, within 512 in all
    src = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": prompt, "chosen": " Truly good.", "rejected": " Bad."}])
    params = load_params(None, ["filter.max_token_length=128", "filter.max_prompt_token_length=16",
                                "filter.policy=drop"])
    result = score.run_file(params, Layout(trained), model=str(other), input_path=str(src),
                            output_path=str(tmp_path / "s.jsonl"))
    assert (result.rejected, result.truncated, result.max_length) == (0, 0, 512)


def test_a_failed_score_leaves_the_last_output_and_its_rejects_as_they_were(trained, tmp_path, capsys):
    from rm_lib.cli import main

    good = {"prompt": "The film was", "chosen": "wonderful and brilliant.", "rejected": "awful and dreadful."}
    same = {"prompt": "The film was", "chosen": "same", "rejected": "same"}
    out = tmp_path / "scores.jsonl"
    aside = tmp_path / "scores.jsonl.rejects.jsonl"
    first = write_jsonl(tmp_path / "first.jsonl", [good, same])
    assert main(["--root", str(trained), "score", "--input", str(first), "--output", str(out)]) == 0
    before = out.read_bytes(), aside.read_bytes()
    second = write_jsonl(tmp_path / "second.jsonl", [dict(same, chosen="other", rejected="other"),
                                                      dict(good, chosen=3)])  # no text: stops at its row
    assert main(["--root", str(trained), "score", "--input", str(second), "--output", str(out)]) == 2
    assert f"error: file {second}, row 2, field 'chosen': " in capsys.readouterr().err
    assert (out.read_bytes(), aside.read_bytes()) == before  # still each other's
    # nothing left to score: the rows set aside go beside, not over the last run's
    third = write_jsonl(tmp_path / "third.jsonl", [same])
    assert main(["--root", str(trained), "score", "--input", str(third), "--output", str(out)]) == 2
    assert f"see {tmp_path / 'scores.jsonl.failed.rejects.jsonl'}" in capsys.readouterr().err
    assert (out.read_bytes(), aside.read_bytes()) == before


def test_a_score_whose_rejects_cannot_be_written_leaves_both_files_as_they_were(trained, tmp_path, capsys,
                                                                             monkeypatch):
    """The rewards were put in place before the rejects were written: a disk that filled between the two
    left new rewards beside the last run's rejects, and the error named --output."""
    from rm_lib.cli import main
    from rm_lib.steps import score

    good = {"prompt": "The film was", "chosen": "wonderful and brilliant.", "rejected": "awful and dreadful."}
    same = {"prompt": "The film was", "chosen": "same", "rejected": "same"}
    out, aside = tmp_path / "scores.jsonl", tmp_path / "scores.jsonl.rejects.jsonl"
    first = write_jsonl(tmp_path / "first.jsonl", [good, same])
    assert main(["--root", str(trained), "score", "--input", str(first), "--output", str(out)]) == 0
    before = out.read_bytes(), aside.read_bytes()
    real = score.write_rows

    def full_disk(handle, rows):
        if aside.name in handle.name:
            raise OSError(28, "No space left on device", handle.name)
        return real(handle, rows)

    monkeypatch.setattr(score, "write_rows", full_disk)
    second = write_jsonl(tmp_path / "second.jsonl", [dict(good, chosen="brilliant."), same])
    assert main(["--root", str(trained), "score", "--input", str(second), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {aside}: cannot be written (No space left on device); {out} and {aside} are as they were")
    assert (out.read_bytes(), aside.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.jsonl", "scores.jsonl", "scores.jsonl.rejects.jsonl",
                                                         "second.jsonl"]  # no temporary left
    # both written, one put in place, then the other refused: the first goes back as it was
    import os

    from rm_lib import files

    monkeypatch.setattr(score, "write_rows", real)
    real_replace, placed = os.replace, []

    def second_refused(src, dst):
        if Path(dst) in (out, aside):
            placed.append(Path(dst))
            if len(placed) == 2:
                raise OSError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", second_refused)
    assert main(["--root", str(trained), "score", "--input", str(second), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f": cannot be written (Permission denied); {out} and {aside} are as they were")
    assert (out.read_bytes(), aside.read_bytes()) == before
    assert len(list(tmp_path.iterdir())) == 4  # no temporary, no earlier copy left


def test_the_scorer_refuses_what_it_would_score_as_something_else(trained):
    """A str scored character by character, None as an empty text, a tool message or a content-less one
    rendered as text: each is now one error naming the item; the scorer's settings are checked."""
    from rm_lib.errors import DataError, SettingsError

    scorer = RewardScorer(trained / "models/reward_model")
    for items, message in [
        ("hello", "got one str: pass [item]"),
        (["fine", None], "item 1: a text (str) or a conversation"),
        ([42], "item 0: a text (str) or a conversation"),
        ([[{"role": "tool", "content": "42"}]], "item 0: conversation[0] has unknown role 'tool'"),
        ([[{"role": "user"}]], "item 0: conversation[0] is not a {'role', 'content'} message"),
        ([[{"role": "assistant", "content": None}]], "item 0: conversation[0].content is not a string"),
        ([[]], "item 0: an empty conversation"),
        (["\ud800"], "item 0: holds a lone surrogate"),
    ]:
        with pytest.raises(DataError, match=re.escape(message)):
            scorer.score(items)
    with pytest.raises(DataError, match="2 prompts but 1 completions"):
        scorer.reward_function()(prompts=["a", "b"], completions=["x"])
    with pytest.raises(DataError, match=re.escape("item 0: a text prompt with a conversation completion; give both")):
        scorer.reward_function()(prompts=["a"], completions=[[{"role": "assistant", "content": "x"}]])
    with pytest.raises(DataError, match=re.escape("item 0: a conversation prompt with a text completion")):
        scorer.reward_function()(prompts=[[{"role": "user", "content": "a"}]], completions=["x"])
    for bad in ({"batch_size": 0}, {"max_length": 0}, {"max_length": 1}, {"max_length": 10_000}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            RewardScorer(trained / "models/reward_model", **bad)
    # batched by length, each reward is its text's alone, in the order given
    texts = ["User: hi\n\nAssistant: " + "very " * n + "good" for n in (9, 0, 30, 3)]
    assert RewardScorer(trained / "models/reward_model", batch_size=2).score(texts) == pytest.approx(
        [scorer.score([t])[0] for t in texts], abs=1e-5)
    # a generator was a bare "object of type 'generator' has no len()": read once, in order
    assert scorer.score(t for t in texts) == scorer.score(texts)
    with pytest.raises(DataError, match="^score takes a list of texts or conversations, got int$"):
        scorer.score(42)


def test_the_tokenizers_chat_template_reads_content_as_training_does(tiny_decoder, tmp_path):
    """Given as they were to the tokenizer's template (`auto` for a decoder that has one), text parts were
    rendered as their Python repr, a message without content or with None as an empty turn, and an empty
    conversation was scored. Text parts are joined, as training joins them; the rest is an error. A tool
    call's content may be None: the template renders the call."""
    from rm_lib.errors import DataError
    from rm_lib.model.modeling import load_reward_model, load_tokenizer, save_model

    tok = load_tokenizer(str(tiny_decoder))
    save_model(load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id), tok, tmp_path / "rm",
               chat_template=True)
    (tmp_path / "rm" / "rm_lib.json").write_text('{"template": "tokenizer"}')  # as train writes it
    scorer = RewardScorer(tmp_path / "rm")
    assert scorer.template == "tokenizer"
    parts = {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}
    assert scorer.encode([parts]) == scorer.encode([{"role": "user", "content": "hello there"}])
    # roles training reads as user and assistant are given to the template as training gave them
    said = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for user, assistant in (("human", "gpt"), ("User", "Assistant"), ("HUMAN", "bot")):
        aliased = [said[0] | {"role": user}, said[1] | {"role": assistant}]
        assert scorer.encode(aliased) == scorer.encode(said), (user, assistant)
    for items, message in [([[]], "item 0: an empty conversation"),
                           ([[{"role": "user"}]], "item 0: conversation[0] is not a {'role', 'content'} message"),
                           ([[parts, {"role": "assistant", "content": None}]],
                            "item 0: conversation[1].content is not a string, nor a list of text parts"),
                           ([[{"role": "user", "content": [{"type": "image", "url": "cat.png"}]}]],
                            "item 0: conversation[0].content is not a string")]:
        with pytest.raises(DataError, match=re.escape(message)):
            scorer.score(items)
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": {}}}]}
    assert scorer.encode([parts, call]) == tok.apply_chat_template([{**parts, "content": "hello there"}, call],
                                                                   tokenize=True)["input_ids"] + [tok.eos_token_id]


def test_the_tokenizers_chat_template_is_given_a_conversation_as_training_gave_it(tiny_decoder, tmp_path):
    """What training gives the template of a pair's messages (their role and content, no blank system
    turn) the scoring API gave it too: it passed a blank system turn, which the template prints (and a
    template such as Qwen's prints its default system prompt where there is none), and a reasoning trace
    training never saw, so a GRPO reward scored text the model was not trained on."""
    from rm_lib.errors import DataError
    from rm_lib.model.modeling import load_reward_model, load_tokenizer, save_model

    tok = load_tokenizer(str(tiny_decoder))
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m.get('reasoning_content') %}<think>"
                         "{{ m['reasoning_content'] }}</think>{% endif %}{{ m['content'] }}\n{% endfor %}")
    save_model(load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id), tok, tmp_path / "rm",
               chat_template=True)
    scorer = RewardScorer(tmp_path / "rm")
    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    trained = scorer.encode([user, answer])
    assert scorer.encode([{"role": "system", "content": " "}, user, answer | {"reasoning_content": "think"}]) == trained
    reward = scorer.reward_function()(prompts=[[{"role": "system", "content": ""}, user]],
                                      completions=[[answer | {"reasoning_content": "think"}]])
    assert reward == scorer.score([[user, answer]])
    assert scorer.encode([{"role": "system", "content": "be brief"}, user, answer]) != trained  # a system turn counts
    with pytest.raises(DataError, match="a conversation of blank system turns"):
        scorer.score([[{"role": "system", "content": ""}]])
    from rm_lib.data.formats import scoring_item

    with pytest.raises(DataError, match="item 0: a conversation of blank system turns"):  # rm_lib's templates too
        scoring_item([{"role": "system", "content": " "}], "item 0")



@pytest.mark.parametrize("pad", ["eos", "none"])
def test_a_reward_model_made_elsewhere_that_pads_with_its_eos_or_has_no_pad_scores_padded_batches(tmp_path, pad):
    """Llama-3-style reward models made elsewhere pad with their EOS or have no pad: the scorer added a pad
    token of its own (as training does) but no embedding row for it, and every batch that needed padding
    ended in an IndexError. Each reward is its text's alone, however the texts are batched."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from rm_lib.cli import main

    from conftest import build_tiny_decoder

    base = build_tiny_decoder(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    if pad == "none":
        tok.pad_token = None
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tok.eos_token_id if pad == "eos" else None)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    texts = ["good film and great acting", "bad", "the plot was fine"]
    scorer = RewardScorer(tmp_path / "rm", batch_size=3)
    assert scorer.score(texts) == pytest.approx([scorer.score([t])[0] for t in texts], abs=1e-5)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "good film and great acting",
                                                    "rejected": "bad"}])
    assert main(["--root", str(tmp_path / "p"), "score", "--model", str(tmp_path / "rm"), "--input", str(pairs),
                 "--output", str(tmp_path / "out.jsonl")]) == 0

def test_score_model_that_is_no_model_folder_says_so(tmp_path, capsys):
    from rm_lib.cli import main

    src = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    release = tmp_path / "release"  # a release: the merged model, its LoRA adapter in adapter/ beside it
    (release / "adapter").mkdir(parents=True)
    (release / "config.json").write_text("{}")
    (release / "adapter" / "adapter_config.json").write_text("{}")
    for model, message in [(tmp_path / "nonexist", "no such folder"),
                           (tmp_path / "notes", "the folder holds no model (no config.json)"),
                           (src, "is a file; name the folder train wrote"),
                           (release / "adapter", "the folder holds no model (no config.json); it is a LoRA adapter "
                            f"(adapter_config.json): name the merged model beside it ({release}), which gives the "
                            "same rewards, or load the adapter onto its base with peft")]:
        argv = ["--root", str(tmp_path), "score", "--input", str(src), "--output", str(tmp_path / "o.jsonl")]
        assert main(argv + ["--model", str(model)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --model {model}: {message}") and err.count("\n") == 1
    assert not (tmp_path / "o.jsonl").exists()
    from rm_lib.errors import SettingsError
    from rm_lib.model.modeling import load_model_config

    with pytest.raises(SettingsError, match=r"has no config.json; it is a LoRA adapter \(adapter_config.json\)"):
        load_model_config(str(release / "adapter"))  # as model.name_or_path


def test_a_missing_model_path_is_named_as_a_path_not_refused_by_the_hub(tmp_path, monkeypatch, capsys):
    """`p1/models/reward_modl` (two slashes: no Hub id), a pathlib.Path, and `models/reward_model` run from the
    wrong folder were read as Hub ids: the Hub's refusal (or offline mode's advice to go online) hid the typo."""
    from rm_lib.cli import main
    from rm_lib.errors import SettingsError
    from rm_lib.evaluation.scoring import RewardScorer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in ("p1/models/reward_modl", Path("models/reward_model")):
        with pytest.raises(SettingsError, match=f"^model_dir {model}: no such folder$"):
            RewardScorer(model)
    src = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    argv = ["score", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--model"]
    assert main(argv + ["p1/models/reward_modl"]) == 2
    assert capsys.readouterr().err == "error: --model p1/models/reward_modl: no such folder\n"
    assert main(argv + ["models/reward_model"]) == 2  # a Hub id by its shape: asked of the Hub, and said so
    assert f"there is no folder 'models/reward_model' in {tmp_path}, so it was asked of the Hub as a model id" \
        in capsys.readouterr().err


@pytest.mark.parametrize("policy, lengths", [("truncate", (20, 6)), ("drop", (42, 14))])
def test_score_of_the_test_pairs_gives_evaluates_rewards_under_filters_lengths(tmp_path, monkeypatch, policy, lengths):
    """score holds pairs to the lengths, and by the policy, the model's pairs were held to (its rm_lib.json)
    as filter held the test pairs evaluate scored (it held them to the model's positions alone, so cut
    pairs scored otherwise): the same rewards, and under drop the same pairs set aside, also where the
    project's filter.policy has changed since. It tokenizes tokenize.batch_size pairs at a time, each batch
    held to the lengths at once (the whole input's uncut tokens were held at once)."""
    from rm_lib.data import tokenization
    from rm_lib.layout import Layout
    from rm_lib.steps import score

    params = tiny_params("train.max_steps=2", f"filter.policy={policy}", f"filter.max_token_length={lengths[0]}",
                         f"filter.max_prompt_token_length={lengths[1]}")
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate")
    layout = Layout(tmp_path)
    evaluated = {r["id"]: r for r in map(json.loads, (layout.evaluation / "scores.jsonl").read_text().splitlines())}
    other = tiny_params("filter.policy=" + ("drop" if policy == "truncate" else "truncate"),  # params.yaml since
                        "tokenize.batch_size=3")
    batches, real = [], tokenization.tokenize_batch
    monkeypatch.setattr(tokenization, "tokenize_batch", lambda pairs, *a: batches.append(len(pairs)) or real(pairs, *a))
    result = score.run_file(other, layout, model=None, input_path=str(layout.pairs / "test.jsonl"),
                            output_path=str(tmp_path / "s.jsonl"))
    scored = {r["id"]: r for r in map(json.loads, (tmp_path / "s.jsonl").read_text().splitlines())}
    assert scored.keys() == evaluated.keys()
    assert max(batches) == 3 and sum(batches) == len((layout.pairs / "test.jsonl").read_text().splitlines())
    for pair_id, row in scored.items():
        for side in ("reward_chosen", "reward_rejected"):
            assert row[side] == pytest.approx(evaluated[pair_id][side], abs=1e-5), (pair_id, side)
    if policy == "truncate":
        assert result.truncated > 0 and result.max_length == 20  # the settings bit: some pairs were cut
        # GRPO's reward function, given each prompt apart from its answer, holds the prompt as filter did too
        from rm_lib.evaluation.scoring import RewardScorer

        pairs = [json.loads(line) for line in (layout.pairs / "test.jsonl").read_text().splitlines()]
        reward = RewardScorer(layout.model).reward_function()
        scorer = RewardScorer(layout.model)
        for side in ("chosen", "rejected"):
            given = reward(prompts=[p["prompt"] for p in pairs], completions=[p[side] for p in pairs])
            assert given == pytest.approx([evaluated[p["id"]][f"reward_{side}"] for p in pairs], abs=1e-5)
            # a whole conversation: its prompt is the messages before the answer (it was read uncut)
            whole = scorer.score([p["prompt"] + p[side] for p in pairs])
            assert whole == pytest.approx([evaluated[p["id"]][f"reward_{side}"] for p in pairs], abs=1e-5)
    else:
        aside = {r["id"] for r in map(json.loads, result.rejects.read_text().splitlines())}
        dropped = {r["id"] for r in map(json.loads, (layout.filtered / "dropped.jsonl").read_text().splitlines())
                   if r["split"] == "test"}
        assert aside == dropped and dropped


def test_a_release_on_the_hub_is_scored_by_its_own_record(tmp_path, monkeypatch, capsys):
    """`score --model me/my-rm`: the release's rm_lib.json (template, lengths) was looked for as a local
    path and never found, so a model this project pushed was scored up to its positions with template
    auto; it is read from the Hub, and a model without one gets none."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from rm_lib.evaluation.scoring import training_record

    record = tmp_path / "rm_lib.json"
    record.write_text(json.dumps({"template": "chatml", "lengths": {"max_token_length": 256}}))
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        if repo_id == "me/my-rm":
            return str(record)
        raise EntryNotFoundError(f"{filename} not in {repo_id}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert training_record("me/my-rm")["lengths"] == {"max_token_length": 256}
    assert training_record("someone/other-rm") == {} and asked[-1] == ("someone/other-rm", "rm_lib.json")
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert training_record("me/my-rm") == {}  # offline and not cached: said, not silent
    assert "me/my-rm: whether it has an rm_lib.json" in capsys.readouterr().err
    assert training_record(str(tmp_path)) == json.loads(record.read_text())  # a folder: read where it is
    (tmp_path / "empty").mkdir()
    assert training_record(str(tmp_path / "empty")) == {}


def test_a_damaged_training_record_is_named_and_the_score_commands_filter_settings_are_its_own(trained, tmp_path,
                                                                                              capsys):
    """rm_lib.json cut short, or with lengths of another type, ended in a traceback or silently other lengths;
    filter.max_token_length set on the score command was ignored without a word while filter.policy was
    read; an input of no rows said all 0 rows were set aside; rejects came in the order they were found."""
    import shutil

    from rm_lib.cli import main
    from rm_lib.errors import DataError
    from rm_lib.evaluation.scoring import training_record

    other = Path(shutil.copytree(trained / "models/reward_model", tmp_path / "other"))
    record = other / "rm_lib.json"
    saved = json.loads(record.read_text())
    for text, message in [('{"template": "simple_chat", "lengths": ', "not valid JSON"),
                          ("[]", "expected an object, got list"),
                          (json.dumps({**saved, "lengths": [64]}), "field 'lengths': expected an object"),
                          (json.dumps({**saved, "lengths": {"max_token_length": 34.0}}),
                           "field 'lengths.max_token_length': expected a whole number"),
                          (json.dumps({**saved, "template": "bogus"}), "field 'template': unknown template")]:
        record.write_text(text)
        with pytest.raises(DataError, match=message) as raised:
            training_record(str(other))
        assert str(record) in str(raised.value)
    record.write_text(json.dumps(saved))
    rows = [{"prompt": "The film was", "chosen": "wonderful and brilliant.", "rejected": "awful and dreadful."},
            {"prompt": "The film was", "chosen": "same", "rejected": "same"},
            {"prompt": "", "chosen": "Alpha. " + LONG, "rejected": "Beta. " + LONG}]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows[::-1])  # the long pair first, then the identical one
    argv = ["--root", str(trained), "score", "--model", str(other), "--input", str(src),
            "--output", str(tmp_path / "s.jsonl")]
    # set alone (params.yaml's prompt limit of 384 is not score's), and a pair between 64 and 128 tokens
    mid = {"prompt": "", "chosen": "Good. " + "The acting was wonderful. " * 16, "rejected": "Bad."}
    src = write_jsonl(tmp_path / "pairs.jsonl", [*rows[::-1], mid])
    assert main([*argv, "--set", "filter.max_token_length=128"]) == 0
    out = capsys.readouterr().out  # held to 128 (not the model's 64), by the model's own policy: drop
    assert "(2 rejected: both_too_long 1, identical 1; 0 truncated to 128 tokens)" in out
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    said = [{"role": "user", "content": ""}, {"role": "assistant", "content": mid["chosen"]}]  # as read: a prompt ""
    whole = RewardScorer(other, max_length=128)
    assert 64 < len(whole.encode(said)) <= 128 and not scored[-1]["truncated"]
    assert scored[-1]["reward_chosen"] == pytest.approx(whole.score([said])[0], abs=1e-5)  # not cut at 64
    aside = [json.loads(line) for line in (tmp_path / "s.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in aside] == [1, 2]  # the reader's and the length's rejects in the input's order
    assert "over the model's limit of 128" in aside[0]["detail"]
    assert main([*argv, "--set", "filter.max_token_length=100000"]) == 2
    assert "filter.max_token_length: 100000 is more than the 512 tokens" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text("[]")  # a JSON list of no rows (a CSV of its header alone is the same)
    assert main(["--root", str(trained), "score", "--input", str(empty), "--output", str(tmp_path / "e.jsonl")]) == 2
    assert "no rows to score: the input holds none" in capsys.readouterr().err


def test_scoring_thousands_of_pairs_says_how_far_it_is_now_and_then(monkeypatch, capsys):
    """evaluate on 2,604 AlpacaEval test pairs ran 13 minutes on a CPU and score 9 minutes with not a line
    between: a line every 30 s says how many are done; a short loop says nothing."""
    import functools

    from rm_lib import progress
    from rm_lib.model import batching

    clock = iter(range(0, 10_000, 20))  # each look at the clock: 20 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    assert batching.in_batches(10, 2, lambda a, b: list(range(a, b)), what="scoring pairs") == list(range(10))
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["scoring pairs: 4 of 10 pairs (40%), 0 min 40 s so far; the shortest first",
                     "scoring pairs: 8 of 10 pairs (80%), 1 min 20 s so far; the shortest first"]
    monkeypatch.setattr(progress.time, "monotonic", lambda: 0.0)
    batching.in_batches(10, 2, lambda a, b: list(range(a, b)), what="score", unit="texts")
    monkeypatch.setenv("WORLD_SIZE", "4")  # a distributed run: processes scoring in step count their own share
    first = "scoring pairs: 4 of 10 pairs on each of 4 processes (40%), 0 min 40 s so far; the shortest first"
    alone = "scoring pairs: 4 of 10 pairs (40%), 0 min 40 s so far; the shortest first"  # the first process alone
    for rank, in_step, said in (("1", True, []), ("0", True, [first]), ("0", False, [alone])):
        monkeypatch.setenv("RANK", rank)  # the first process alone speaks
        monkeypatch.setattr(progress.time, "monotonic", functools.partial(next, iter(range(0, 10_000, 20))))
        batching.in_batches(10, 2, lambda a, b: list(range(a, b)), what="scoring pairs", shrink=not in_step)
        assert capsys.readouterr().err.splitlines()[:1] == said


def test_score_counts_every_text_once_and_says_how_far_its_tokenizing_is(trained, tmp_path, monkeypatch, capsys):
    """score's progress line counted the chosen sides as the texts, then began again at 0% for the
    rejected ones (200k pairs: 100% after about 40 minutes, then 0%); and it tokenized for minutes
    without a line."""
    from rm_lib import progress
    from rm_lib.cli import main

    pairs = [{"prompt": f"Review {i}?", "chosen": "The acting was wonderful.", "rejected": "Bad."} for i in range(6)]
    src = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    clock = iter(range(0, 100_000, 20))  # each look at the clock: 20 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    assert main(["--root", str(trained), "score", "--input", str(src), "--output", str(tmp_path / "s.jsonl"),
                 "--set", "evaluate.batch_size=2", "--set", "tokenize.batch_size=2"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if " of " in line]
    assert "score: tokenize: 4 of 6 pairs (66%), 0 min 40 s so far" in lines
    texts = [line for line in lines if "texts" in line]
    assert texts and all(" of 12 texts " in line for line in texts)
    done = [int(line.split(": ")[1].split(" of ")[0]) for line in texts]
    assert done == sorted(done)  # one pass: it never starts again


@pytest.fixture(scope="module")
def trained_decoder(tmp_path_factory, tiny_decoder):
    root = tmp_path_factory.mktemp("scored-decoder")
    run_steps(tiny_params("train.max_steps=2", "tokenize.template=chatml", model=str(tiny_decoder)), root,
              "download", "tokenize", "filter", "train")
    return root / "models/reward_model"


def test_a_model_folder_with_a_lost_or_damaged_file_is_refused_naming_it(trained_decoder, tmp_path):
    """Without tokenizer_config.json the decoder's tokenizer named no EOS: every reward was read one token
    early, other than training's and plain transformers', unsaid. rm_lib.json records the tokens training put
    around a text; a cut-short model.safetensors ended in the reader's traceback."""
    from rm_lib.errors import SettingsError

    recorded = json.loads((trained_decoder / "rm_lib.json").read_text())["special_tokens"]
    assert recorded == {"prefix": [1], "end": 2}
    assert RewardScorer(trained_decoder).special.end == 2

    def damaged(name: str, change) -> Path:
        folder = tmp_path / name
        import shutil

        shutil.copytree(trained_decoder, folder)
        change(folder)
        return folder

    def older(folder: Path) -> None:  # a model saved before rm_lib.json recorded the tokens
        record = json.loads((folder / "rm_lib.json").read_text())
        del record["special_tokens"]
        (folder / "rm_lib.json").write_text(json.dumps(record))

    # not judged without a record: a config's eos_token_id is often a default its tokenizer never adds
    assert RewardScorer(damaged("older", older)).special.end == 2
    for folder, message in [
        (damaged("no-config", lambda f: (f / "tokenizer_config.json").unlink()),
         "its tokenizer puts [1] before a text and ends it with None, where training put [1] and 2 (rm_lib.json): "
         "a file of the tokenizer (tokenizer_config.json, tokenizer.json) is missing"),
        (damaged("no-tokenizer", lambda f: (f / "tokenizer.json").unlink()),
         "the folder holds no tokenizer file (no tokenizer.json, vocabulary or sentencepiece model)"),
        (damaged("cut", lambda f: os.truncate(f / "model.safetensors", 1000)),
         "model.safetensors is damaged or incomplete (Error while deserializing header"),
    ]:
        with pytest.raises(SettingsError, match=re.escape(message)):
            RewardScorer(folder)
    from rm_lib.model.modeling import _no_tokenizer_file

    (tmp_path / "deberta").mkdir()
    (tmp_path / "deberta" / "spm.model").write_bytes(b"x")  # DeBERTa-v3's sentencepiece model is a tokenizer file
    assert _no_tokenizer_file(str(tmp_path / "deberta")) == ""


def test_the_released_tokenizer_cuts_at_the_models_positions_and_auto_is_the_recorded_template(trained_decoder):
    """The tiny decoder's base tokenizer knows no length (1e30): `pipeline(..., truncation=True)` cut
    nothing and the model read past its 256 positions. `template="auto"` is the template training recorded
    (it was the tokenizer's own), and an unknown one is refused when the scorer is made, not at a KeyError
    when a conversation comes."""
    from transformers import AutoTokenizer

    from rm_lib.errors import SettingsError

    released = AutoTokenizer.from_pretrained(trained_decoder)
    assert released.model_max_length == 256
    long = " ".join(["good"] * 400)
    assert len(released(long, truncation=True)["input_ids"]) == 256
    scorer = RewardScorer(trained_decoder, template="auto")
    assert scorer.template == RewardScorer(trained_decoder).template == "chatml"
    with pytest.raises(SettingsError, match=re.escape("template: unknown template 'llama3'; use auto, tokenizer")):
        RewardScorer(trained_decoder, template="llama3")


def test_the_scorers_arguments_are_checked_with_what_is_wrong(trained, tmp_path):
    """A missing local folder was read as a malformed Hub id, an adapter's folder as a tokenizer that cannot
    be built, a CUDA device on a build without one ended in an AssertionError, names of another length in
    an IndexError, numpy's integers were refused, and an empty conversation as completion scored the prompt
    alone."""
    import numpy as np
    import torch

    from rm_lib.errors import DataError, SettingsError

    model = trained / "models/reward_model"
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    for folder, message in [(tmp_path / "gone", "no such folder"),
                            (tmp_path / "adapter", "the folder holds no model (no config.json); it is a LoRA adapter")]:
        with pytest.raises(SettingsError, match=re.escape(f"model_dir {folder}: {message}")):
            RewardScorer(folder)
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="device: 'cuda' asked for, but this torch has no CUDA device"):
            RewardScorer(model, device="cuda")
    for bad in (2.0, "8", True):
        with pytest.raises(SettingsError, match=re.escape(f"batch_size: must be a whole number of at least 1, got "
                                                          f"{bad!r}")):
            RewardScorer(model, batch_size=bad)
    scorer = RewardScorer(model, batch_size=np.int64(2))
    assert scorer.batch_size == 2 and type(scorer.batch_size) is int
    with pytest.raises(DataError, match="2 items but 1 names"):
        scorer.score_detailed(["a", "b"], names=["x"])
    with pytest.raises(DataError, match=re.escape("item 0: the completion is an empty conversation")):
        scorer.reward_function()(prompts=[[{"role": "user", "content": "hi"}]], completions=[[]])


def test_normalised_rewards_use_the_training_stats_and_a_model_without_them_is_refused(trained, tmp_path):
    """normalize=True on a model without reward_mean/reward_std (another project's, an earlier version's)
    returned the raw rewards as if normalised; a reward_std of 0 was read as 1."""
    import shutil

    from rm_lib.errors import SettingsError

    model = trained / "models/reward_model"
    config = json.loads((model / "config.json").read_text())
    texts = ["User: How was the film?\n\nAssistant: Wonderful.", "User: How was the film?\n\nAssistant: Awful."]
    raw = RewardScorer(model).score(texts)
    normalised = RewardScorer(model, normalize=True).score(texts)
    assert normalised == pytest.approx([(r - config["reward_mean"]) / config["reward_std"] for r in raw], abs=1e-6)
    # OpenRLHF's names for the stats, and the problem vLLM reads the one label as (no sigmoid on the reward)
    assert (config["mean"], config["std"], config["problem_type"]) == \
        (config["reward_mean"], config["reward_std"], "regression")
    for name, change, said in (
            ("no stats", lambda c: {k: v for k, v in c.items() if k not in ("reward_mean", "reward_std")},
             "holds no reward_mean and reward_std"),
            ("no spread", lambda c: {**c, "reward_std": 0.0}, "had no spread in training"),
            ("not a number", lambda c: {**c, "reward_mean": "x"}, "holds reward_mean 'x' and reward_std"),
            ("past a float", lambda c: {**c, "reward_std": 10 ** 400}, "which are not both numbers"),
            ("subnormal spread", lambda c: {**c, "reward_std": 5e-324}, "had no spread in training")):
        copy = tmp_path / name
        shutil.copytree(model, copy)
        (copy / "config.json").write_text(json.dumps(change(config)))
        with pytest.raises(SettingsError, match=f"^normalize: .*{said}.*score it with normalize=False"):
            RewardScorer(copy, normalize=True)
        assert RewardScorer(copy).score(texts) == pytest.approx(raw, abs=1e-6)


def test_another_projects_model_is_scored_as_transformers_scores_it(tiny_decoder, tmp_path, capsys):
    """A reward model trained by TRL (no rm_lib.json; pad == EOS, as TRL sets the config's pad) read its reward at
    a conversation's last token and, through transformers, before a text's EOS: rm_lib added an EOS and read the
    reward there, other numbers with no word said. It is now scored on its tokenizer's own ids (a conversation's
    as apply_chat_template gives them) and read where transformers reads it, by RewardScorer and by `score`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rm_lib.cli import main

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder)
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_decoder, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # as TRL's RewardTrainer leaves it: the EOS
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    model.save_pretrained(tmp_path / "trl_rm")
    tokenizer.save_pretrained(tmp_path / "trl_rm")
    model.eval()
    text = "the film was a delightful surprise"
    conversation = [{"role": "user", "content": "how was the film"}, {"role": "assistant", "content": text}]
    with torch.no_grad():
        expected = [model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item()
                    for t in (text, text + tokenizer.eos_token)]  # TRL's text format ends with the EOS
        expected.append(model(**tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                                               return_tensors="pt")).logits[0, 0].item())
    assert expected[0] == pytest.approx(expected[1], abs=1e-6)  # transformers reads before a pad == EOS
    scorer = RewardScorer(tmp_path / "trl_rm", batch_size=2)
    assert scorer.score([text, text + tokenizer.eos_token, conversation]) == pytest.approx(expected, abs=1e-5)
    # TRL's GRPO gives a reward model a text prompt and completion joined, nothing added
    prompt = tokenizer.apply_chat_template([conversation[0]], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        grpo = model(**tokenizer(prompt + text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
    assert scorer.reward_function()(prompts=[prompt], completions=[text]) == pytest.approx([grpo], abs=1e-5)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": [conversation[0]], "chosen": [conversation[1]],
                                                    "rejected": [{"role": "assistant", "content": "dull"}]}])
    assert main(["--root", str(tmp_path), "score", "--model", str(tmp_path / "trl_rm"), "--input", str(pairs),
                 "--output", str(tmp_path / "out.jsonl")]) == 0
    row = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert row["reward_chosen"] == pytest.approx(expected[2], abs=1e-5)
    # a chat template that writes no BOS: apply_chat_template's ids have none, and neither do the scored ones
    tokenizer.chat_template = tokenizer.chat_template.replace("{{ bos_token }}", "")
    tokenizer.save_pretrained(tmp_path / "trl_rm")
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    assert ids["input_ids"][0, 0].item() != tokenizer.bos_token_id
    with torch.no_grad():
        expected = model(**ids).logits[0, 0].item()
    assert RewardScorer(tmp_path / "trl_rm").score([conversation]) == pytest.approx([expected], abs=1e-5)
    # a pad of its own (Qwen's): TRL trained a text with the EOS it adds, read there; so is it scored
    model.config.pad_token_id = tokenizer.unk_token_id
    model.save_pretrained(tmp_path / "trl_rm")
    with torch.no_grad():
        expected = model(**tokenizer(text + tokenizer.eos_token, return_tensors="pt")).logits[0, 0].item()
    assert RewardScorer(tmp_path / "trl_rm").score([text]) == pytest.approx([expected], abs=1e-5)


def test_one_of_this_projects_models_without_its_rm_lib_json_is_scored_as_trained(trained_own_template, tmp_path):
    """A copy of this project's model that lost its rm_lib.json (save_pretrained of it, an offline Hub cache
    without it) names its run in its config: it is scored as trained (the end token training added), not as
    another project's model."""
    import shutil

    conversation = [{"role": "user", "content": "how was the film"}, {"role": "assistant", "content": "dull"}]
    shutil.copytree(trained_own_template, tmp_path / "copy")
    (tmp_path / "copy" / "rm_lib.json").unlink()
    own, copy = RewardScorer(trained_own_template), RewardScorer(tmp_path / "copy")
    assert not copy.foreign and copy.encode(conversation) == own.encode(conversation)
    assert copy.score([conversation, "a text"]) == pytest.approx(own.score([conversation, "a text"]), abs=1e-6)
