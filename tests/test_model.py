import contextlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from rm_lib.data.tokenization import template_as_trained
from rm_lib.errors import SettingsError
from rm_lib.evaluation.metrics import pair_metrics
from rm_lib.model.loss import bradley_terry_loss
from rm_lib.model.modeling import add_lora, load_model_config, load_reward_model, load_tokenizer, rewards, save_model


def test_bradley_terry_loss_with_margin_and_centering():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    plain = -(torch.log(torch.sigmoid(torch.tensor(1.0))) + torch.log(torch.sigmoid(torch.tensor(-1.0)))) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(plain.item())
    m = torch.tensor([0.5, 0.5])
    with_margin = -(torch.log(torch.sigmoid(torch.tensor(0.5))) + torch.log(torch.sigmoid(torch.tensor(-1.5)))) / 2
    assert bradley_terry_loss(rc, rr, m).item() == pytest.approx(with_margin.item())
    centred = plain + 0.01 * ((3.0 ** 2 + 1.0 ** 2) / 2)
    assert bradley_terry_loss(rc, rr, None, 0.01).item() == pytest.approx(centred.item())



def test_bradley_terry_loss_refuses_rewards_that_would_broadcast_against_the_margins():
    """Scores of [B, 1] less margins of [B] would make a [B, B] loss: every pair against every margin."""
    rc, rr, m = torch.tensor([[2.0], [0.0]]), torch.tensor([[1.0], [1.0]]), torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="one value per pair"):
        bradley_terry_loss(rc, rr, m)
    with pytest.raises(ValueError, match="one value per pair"):
        bradley_terry_loss(rc[:, 0], rr[:, 0], m[:1])

def test_ties_count_as_wrong_and_baselines_are_reported():
    m = pair_metrics([1.0, 2.0, 0.5, 0.0], [1.0, 1.0, 0.7, -1.0], [10, 20, 5, 8], [5, 10, 9, 8], buckets=2)
    assert m["accuracy"] == 0.5 and m["tie_rate"] == 0.25
    assert m["longer_wins_baseline"] == 0.5 and m["shorter_wins_baseline"] == 0.25
    assert sum(b["pairs"] for b in m["per_length_bucket"]) == 4


def test_the_held_out_loss_is_the_training_loss_of_the_same_rewards():
    """evaluate's `loss` is the Bradley-Terry loss training minimises, also where a margin is far past
    where exp() overflows."""
    chosen, rejected = [0.0, 2.0, -1.0, 40.0, -40.0, 0.5], [0.0, 0.0, 1.0, 0.0, 0.0, 0.5]
    m = pair_metrics(chosen, rejected, [1] * 6, [2] * 6)
    expected = bradley_terry_loss(*(torch.tensor(v, dtype=torch.float64) for v in (chosen, rejected)))
    assert m["loss"] == pytest.approx(expected.item(), rel=1e-9)


def test_pad_equal_to_eos_gets_a_pad_token_of_its_own_and_every_loader_reads_the_same_score(tiny_decoder, tmp_path):
    from transformers import AutoTokenizer, pipeline

    assert AutoTokenizer.from_pretrained(tiny_decoder).pad_token == "</s>"  # the model pads with its EOS
    tok = load_tokenizer(str(tiny_decoder))
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token == "<|pad|>"
    model = load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id).eval()
    assert model.get_input_embeddings().num_embeddings == len(tok) and model.config.pad_token_id == tok.pad_token_id
    short = [tok.bos_token_id, 7, 8, tok.eos_token_id]
    long = [tok.bos_token_id, 9, 10, 11, 12, 13, tok.eos_token_id]
    ids = torch.tensor([short + [tok.pad_token_id] * 3, long])
    mask = torch.tensor([[1] * 4 + [0] * 3, [1] * 7])
    with torch.no_grad():
        batched = rewards(model, ids, mask)
        alone = rewards(model, torch.tensor([short]), torch.ones(1, 4, dtype=torch.long))
        # transformers' own pooling (last token that is not pad) now reads the EOS as well (#35352)
        theirs = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert batched[0].item() == pytest.approx(alone.item(), abs=1e-5)
    assert theirs.tolist() == pytest.approx(batched.tolist(), abs=1e-5)
    # and so does a plain pipeline on the saved folder
    from rm_lib.model.modeling import save_model

    save_model(model, tok, tmp_path / "rm")
    text = tok.decode(long[1:-1])
    scorer = pipeline("text-classification", model=str(tmp_path / "rm"), function_to_apply="none")
    ids_again = scorer.tokenizer(text)["input_ids"]
    with torch.no_grad():
        ours = rewards(model, torch.tensor([ids_again]), torch.ones(1, len(ids_again), dtype=torch.long))
    assert scorer(text)[0]["score"] == pytest.approx(ours.item(), abs=1e-5)


def test_the_saved_tokenizer_ends_a_text_as_training_did_so_plain_loaders_read_the_same_reward(tiny_decoder,
                                                                                               tmp_path):
    """Training appends an EOS and reads the reward there; the tiny decoder's tokenizer (Llama-style)
    adds only a BOS. The saved tokenizer adds both, so `pipeline(text)` gives RewardScorer's reward,
    not the hidden state one token early."""
    from transformers import AutoTokenizer, pipeline

    from rm_lib.evaluation.scoring import RewardScorer

    tok = load_tokenizer(str(tiny_decoder))
    assert tok("good film")["input_ids"][-1] != tok.eos_token_id  # the base tokenizer ends with no EOS
    save_model(load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id), tok, tmp_path / "rm",
               chat_template=True)  # as trained with the tokenizer's template (it scores a conversation below)
    (tmp_path / "rm" / "rm_lib.json").write_text('{"template": "tokenizer"}')  # as train writes it
    saved = AutoTokenizer.from_pretrained(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(config)  # how it was loaded here (offline) is not released
    body = tok("good film", add_special_tokens=False)["input_ids"]
    assert saved("good film")["input_ids"] == [tok.bos_token_id, *body, tok.eos_token_id]
    assert saved("good film", add_special_tokens=False)["input_ids"] == body
    texts = ["good film", "the acting was not good and the plot was awful"]
    ours = RewardScorer(tmp_path / "rm").score(texts)
    theirs = [r["score"] for r in pipeline("text-classification", model=str(tmp_path / "rm"),
                                            function_to_apply="none")(texts)]
    assert theirs == pytest.approx(ours, abs=1e-5)
    assert tok("good film")["input_ids"] == [tok.bos_token_id, *body]  # the tokenizer in use is left as it was
    # a tokenizer that pads on the left is released padding on the right, as training and evaluation did (a
    # model with absolute positions, GPT-2, reads other rewards from a left-padded batch)
    left = AutoTokenizer.from_pretrained(tiny_decoder, padding_side="left")  # saved so in its config
    save_model(load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id), left, tmp_path / "left")
    assert AutoTokenizer.from_pretrained(tmp_path / "left").padding_side == "right" and left.padding_side == "left"
    # a conversation, as the model card says: the chat template's text, less the BOS it wrote
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "good film"}]
    text = saved.apply_chat_template(chat, tokenize=False)
    assert text.startswith(saved.bos_token)
    scorer = RewardScorer(tmp_path / "rm", template="tokenizer")
    piped = pipeline("text-classification", model=str(tmp_path / "rm"), function_to_apply="none")
    assert piped(text.removeprefix(saved.bos_token))[0]["score"] == pytest.approx(scorer.score([chat])[0], abs=1e-5)


def test_the_released_tokenizer_cuts_a_long_text_as_training_did_keeping_its_end(tmp_path, tiny_decoder):
    """transformers' tokenizers cut on the right: `pipeline(text, truncation=True)` on a text past the model's
    512 tokens read its start, and every answer after a long prompt got one reward. Released, the tokenizer
    keeps the end, as training and RewardScorer do."""
    from transformers import AutoTokenizer, pipeline

    from rm_lib.evaluation.scoring import RewardScorer
    from rm_lib.model.modeling import save_model

    tok = load_tokenizer("default")
    save_model(load_reward_model("default", pad_token_id=tok.pad_token_id), tok, tmp_path / "rm")
    prompt = "User: " + "the movie was good. " * 200 + "\n\nAssistant: "
    texts = [prompt + "I loved every minute of it.", prompt + "It was dull and far too long."]
    ours = RewardScorer(tmp_path / "rm").score_detailed(texts)
    assert all(ours.truncated)
    piped = pipeline("text-classification", model=str(tmp_path / "rm"), function_to_apply="none")
    theirs = [r["score"] for r in piped(texts, truncation=True)]
    assert theirs == pytest.approx(ours.rewards, abs=1e-5) and abs(theirs[0] - theirs[1]) > 1e-4
    assert tok.truncation_side == "right"  # the tokenizer in use is left as it was
    # to the length training held texts to, as the card's line for long texts says
    held = RewardScorer(tmp_path / "rm", max_length=128).score(texts)
    assert [r["score"] for r in piped(texts, truncation=True, max_length=128)] == pytest.approx(held, abs=1e-5)
    # a tokenizer whose config names no side (most do not) is released cutting on the left too
    decoder = load_tokenizer(str(tiny_decoder))
    assert "truncation_side" not in json.loads((tiny_decoder / "tokenizer_config.json").read_text())
    save_model(load_reward_model(str(tiny_decoder), pad_token_id=decoder.pad_token_id), decoder, tmp_path / "decoder")
    assert AutoTokenizer.from_pretrained(tmp_path / "decoder").truncation_side == "left"


CARD_CHAT = [{"role": "user", "content": "How do I boil an egg?"},
             {"role": "assistant", "content": "Put it in boiling water for eight minutes."}]


def test_the_cards_pipeline_example_is_in_the_rm_lib_template_training_used(tmp_path):
    """A model trained with rm_lib's chatml was shown a `User: ...` text in the card: its own template's
    text scores the reward training measured."""
    from rm_lib.evaluation.scoring import RewardScorer
    from rm_lib.model.modeling import save_model
    from rm_lib.publish import model_card

    tok = load_tokenizer("default")
    save_model(load_reward_model("default", pad_token_id=tok.pad_token_id), tok, tmp_path / "rm")
    (tmp_path / "rm" / "rm_lib.json").write_text('{"template": "chatml"}')
    usage = model_card._usage(str(tmp_path / "rm"), tokenizer=model_card.tokenizer_facts(tmp_path / "rm"))
    code = re.findall(r"```python\n(.*?)```", usage, re.S)[0]
    assert "<|im_start|>user" in code and "User: How" not in code
    scope: dict = {}
    exec(code.replace("rm(", "score = rm(", 1), scope)  # noqa: S102 - the card's own instructions
    assert scope["score"][0]["score"] == pytest.approx(RewardScorer(tmp_path / "rm").score([CARD_CHAT])[0], abs=1e-5)
    # for a text longer than training read, the line the card adds: the scorer's reward at that length
    usage = model_card._usage(str(tmp_path / "rm"), tokenizer=model_card.tokenizer_facts(tmp_path / "rm"),
                              max_length=64)
    code = re.findall(r"```python\n(.*?)```", usage, re.S)[0]
    long_text = ("<|im_start|>user\n" + "the film was good. " * 60 +
                 "<|im_end|>\n<|im_start|>assistant\nfine<|im_end|>\n")
    scope = {"long_text": long_text}
    exec(code.replace("rm(long_text", "score = rm(long_text"), scope)  # noqa: S102
    held = RewardScorer(tmp_path / "rm", max_length=64).score([long_text])[0]
    assert scope["score"][0]["score"] == pytest.approx(held, abs=1e-5)


def card_reward(folder: Path) -> float:
    """The reward the card's first example computes, run as the card writes it, on the released folder."""
    from rm_lib.publish import model_card

    usage = model_card._usage(str(folder), tokenizer=model_card.tokenizer_facts(folder))
    code = re.findall(r"```python\n(.*?)```", usage, re.S)[0]
    assert "apply_chat_template" in code and "User: How" not in code  # not text in words the model never read
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's own instructions
    assert scope["messages"] == CARD_CHAT
    return scope["reward"]



def released_tiny_llama(tok, folder: Path):
    """A tiny Llama reward model saved with `tok` as train saves one trained with the tokenizer's chat
    template; its RewardScorer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rm_lib.evaluation.scoring import RewardScorer

    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    save_model(LlamaForSequenceClassification(config).eval(), tok, folder, chat_template=True)
    (folder / "rm_lib.json").write_text('{"template": "tokenizer"}')  # as train writes it
    return RewardScorer(folder, template="tokenizer")

def test_the_cards_conversation_recipe_gives_training_ids_where_retokenizing_the_text_does_not(tmp_path):
    """A SentencePiece-style tokenizer (Llama-2, Mistral: a word start only at the start of a text) with a
    template that writes BOS and EOS: training tokenized the rendered text after its literal BOS, so the
    text less its BOS given to `tokenizer(text)` (the card's old advice) got an extra word start and
    another reward. The card now says apply_chat_template(tokenize=True), which gives training's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from rm_lib.evaluation.scoring import RewardScorer
    from rm_lib.publish import model_card

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    bpe.train_from_iterator(["[INST] hello there [/INST] good film", "bad plot"] * 5, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                         " [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    scorer = released_tiny_llama(tok, tmp_path / "rm")
    chat = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "good film"}]
    trained_ids = scorer.encode(chat)  # the ids training had
    text = tok.apply_chat_template(chat, tokenize=False)
    assert tok(text.removeprefix(tok.bos_token))["input_ids"] != trained_ids  # the old advice
    facts = model_card.tokenizer_facts(tmp_path / "rm")
    assert facts["chat_start"] == [] and facts["chat_end"] is False  # the template writes both
    rules = model_card._text_rules(facts)
    recipe = 'ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]`'
    assert recipe + ", as they are" in rules
    ids = tok.apply_chat_template(chat, tokenize=True)["input_ids"]
    assert ids == trained_ids
    with torch.no_grad():
        reward = scorer.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert reward == pytest.approx(scorer.score([chat])[0], abs=1e-5)
    assert card_reward(tmp_path / "rm") == pytest.approx(scorer.score([CARD_CHAT])[0], abs=1e-5)
    # the tokenizer's template renders what GRPO with tools hands a reward function, as given
    tools = chat + [{"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": {}}}]}, {"role": "tool", "content": "42"}]
    assert scorer.encode(tools) == tok.apply_chat_template(tools, tokenize=True)["input_ids"]
    # a template that writes neither: the card names both tokens to add
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(tmp_path / "rm")
    facts = model_card.tokenizer_facts(tmp_path / "rm")
    assert "with `<s>` before them and `</s>` after them" in model_card._text_rules(facts)
    assert card_reward(tmp_path / "rm") == pytest.approx(
        RewardScorer(tmp_path / "rm", template="tokenizer").score([CARD_CHAT])[0], abs=1e-5)
    # a template that refuses a plain exchange (it wants a system message first): the card is still written
    tok.chat_template = "{{ raise_exception('a system message first') }}"
    tok.save_pretrained(tmp_path / "rm")
    facts = model_card.tokenizer_facts(tmp_path / "rm")
    assert "with `</s>` after them" in model_card._text_rules(facts)


def test_the_saved_template_ends_a_conversation_with_the_eos_training_read_the_reward_at(tmp_path):
    """TRL's GRPO and RLOO given the model's name, and apply_chat_template(..., tokenize=True), tokenize the
    template's text with no special tokens: where the template wrote no EOS they read the reward a token
    early. train saves a template that writes it after a whole conversation; a BOS the tokenizer adds stays
    the tokenizer's (written as text, `pipeline` on the template's text would double it), and the card
    names it. rm_lib itself renders with the template training used (TRL's text completions were closed
    with the EOS twice)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from rm_lib.data import templates
    from rm_lib.model.special import add_special, special_tokens
    from rm_lib.publish import model_card

    def tokenizer(pre_tokenizer, template: str) -> PreTrainedTokenizerFast:
        bpe = Tokenizer(models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = pre_tokenizer
        bpe.train_from_iterator(["[INST] hello there [/INST] good film", "bad plot Be brief Blue"] * 5,
                                trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"]))
        bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="<unk>")
        tok.chat_template = template
        return tok

    chats = [CARD_CHAT, [{"role": "system", "content": "Be brief"}, *CARD_CHAT],
             [*CARD_CHAT, {"role": "user", "content": "hello there"}, {"role": "assistant", "content": "bad plot"}]]

    def trained_ids(tok, chat) -> list[int]:
        rendered = tok(templates.render(chat, "tokenizer", tok), add_special_tokens=False)["input_ids"]
        return add_special(rendered, special_tokens(tok))

    turns = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    turns += "{% if add_generation_prompt %}[assistant]{% endif %}"
    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    for name, tok, writes_bos in [("bos", tokenizer(pre_tokenizers.Whitespace(), "{{ bos_token }}" + turns), True),
                                  ("no-bos", tokenizer(pre_tokenizers.Whitespace(), turns), False),
                                  ("sentencepiece", tokenizer(metaspace, turns), False)]:
        saved = template_as_trained(tok)
        assert saved is not tok and templates.trained_template(saved) == tok.chat_template
        for chat in chats:
            ids = saved.apply_chat_template(chat, tokenize=True)["input_ids"]
            assert ([] if writes_bos else [tok.bos_token_id]) + ids == trained_ids(tok, chat), name
            text = saved.apply_chat_template(chat, tokenize=False)  # as TRL's reward functions read it
            assert saved(text, add_special_tokens=False)["input_ids"] == ids
            assert templates.render(chat, "tokenizer", saved) == tok.apply_chat_template(chat, tokenize=False)
        prompt = tok.apply_chat_template(CARD_CHAT[:1], tokenize=False, add_generation_prompt=True)
        assert saved.apply_chat_template(CARD_CHAT[:1], tokenize=False, add_generation_prompt=True) == prompt
        assert templates.turn_closing("tokenizer", saved) == templates.turn_closing("tokenizer", tok) == "\n"
        scorer = released_tiny_llama(saved, tmp_path / name)
        assert scorer.encode(CARD_CHAT) == trained_ids(tok, CARD_CHAT)
        facts = model_card.tokenizer_facts(tmp_path / name)
        assert (facts["chat_start"], facts["chat_end"]) == ([] if writes_bos else ["<s>"], False), name
        assert ("read training's reward" in model_card._by_name("me/rm", facts)) is writes_bos
        assert card_reward(tmp_path / name) == pytest.approx(scorer.score([CARD_CHAT])[0], abs=1e-5)
        if not writes_bos:  # the template's text under `pipeline`: the tokenizer adds the BOS, the text has the EOS
            text = saved.apply_chat_template(CARD_CHAT, tokenize=False)
            assert saved(text)["input_ids"] == trained_ids(tok, CARD_CHAT), name
    # a template that writes the EOS already (Llama-2's), or marks assistant tokens: saved as it is
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                         " [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    assert template_as_trained(tok) is tok
    tok.chat_template = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert template_as_trained(tok) is tok
    # a release an earlier version saved, its template writing the BOS too: rendered as training rendered
    bos_first = "{% if not rm_lib_text.startswith(bos_token) %}{{ bos_token }}{% endif %}{{ rm_lib_text }}"
    earlier = templates.ending_with_eos(turns).replace("{{ rm_lib_text }}", bos_first)
    tok.chat_template = earlier
    assert templates.trained_template(tok) == turns

def test_a_chatml_template_whose_end_of_turn_is_the_eos_ends_every_path_alike(tmp_path):
    """Qwen2.5-Instruct's layout: the EOS is `<|im_end|>` and the template writes a line break after it.
    The text ends with that line break, so the EOS is added after it; the scorer, the released tokenizer
    under `pipeline` and the card's recipe all give those ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers import pipeline as hf_pipeline


    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["user How do I boil an egg? assistant Put it in boiling water"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    scorer = released_tiny_llama(template_as_trained(tok), tmp_path / "rm")  # as train saves it
    trained_ids = scorer.encode(CARD_CHAT)
    end, newline = tok.eos_token_id, tok("\n", add_special_tokens=False)["input_ids"]
    assert trained_ids[-3:] == [end, *newline, end] and trained_ids.count(end) == 3
    released = AutoTokenizer.from_pretrained(tmp_path / "rm")
    text = released.apply_chat_template(CARD_CHAT, tokenize=False)  # the saved template writes the last EOS
    assert text == tok.apply_chat_template(CARD_CHAT, tokenize=False) + "<|im_end|>"
    assert released(text)["input_ids"] == trained_ids
    rm = hf_pipeline("text-classification", model=str(tmp_path / "rm"), function_to_apply="none")
    assert rm(text)[0]["score"] == pytest.approx(scorer.score([CARD_CHAT])[0], abs=1e-5)
    assert card_reward(tmp_path / "rm") == pytest.approx(scorer.score([CARD_CHAT])[0], abs=1e-5)
    # TRL's text format: a completion closed or not by the model's end token is scored as the conversation
    prompt = tok.apply_chat_template(CARD_CHAT[:1], tokenize=False, add_generation_prompt=True)
    answer = CARD_CHAT[1]["content"]
    for completion in (answer, answer + "<|im_end|>", answer + "<|im_end|>\n"):
        given = scorer.reward_function()(prompts=[prompt], completions=[completion])
        assert given == pytest.approx(scorer.score([CARD_CHAT]), abs=1e-6), completion

def test_a_release_carries_the_keys_transformers_4_reads(tmp_path, tiny_decoder):
    """An RLHF stack on transformers 4.x read transformers 5's files otherwise: no `rope_theta` beside
    `rope_parameters` (it took 10,000 where the base trained with 500,000), a tokenizer class it does not
    know (TokenizersBackend: no load), and a Llama tokenizer rebuilt its ends from `add_bos_token` and
    `add_eos_token`, absent (a BOS and no EOS: the reward read elsewhere). Each is written where
    transformers 5 still reads the folder as saved."""
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from rm_lib.model.modeling import load_tokenizer
    from rm_lib.publish import model_card

    tok = load_tokenizer(str(tiny_decoder))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id,
                         rope_theta=500000.0)
    for chat in (False, True):
        folder = tmp_path / f"rm-{chat}"
        save_model(LlamaForSequenceClassification(config).eval(), template_as_trained(tok) if chat else tok, folder,
                   chat_template=chat)
        written = json.loads((folder / "config.json").read_text())
        assert written["rope_theta"] == 500000.0 and "rope_scaling" not in written
        assert AutoConfig.from_pretrained(folder).rope_parameters == config.rope_parameters
        saved = json.loads((folder / "tokenizer_config.json").read_text())
        assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"
        released = AutoTokenizer.from_pretrained(folder)
        ids, plain = released("good film")["input_ids"], released("good film", add_special_tokens=False)["input_ids"]
        assert saved["add_bos_token"] == (ids[0] == tok.bos_token_id != plain[0]) is True
        # the end token: the tokenizer's for a text, the saved template's for a conversation
        assert saved["add_eos_token"] == (ids[-1] == tok.eos_token_id != plain[-1]) is not chat
        facts = model_card.tokenizer_facts(folder)
        assert f"Saved by transformers `{written['transformers_version']}`; `config.json`" in \
            model_card._usage("me/rm", tokenizer=facts)
    # a folder without them (an earlier version's release): the card does not say they are there
    (folder / "tokenizer_config.json").write_text(json.dumps({**saved, "tokenizer_class": "TokenizersBackend"}))
    usage = model_card._usage("me/rm", tokenizer=model_card.tokenizer_facts(folder))
    assert f"Saved by transformers `{written['transformers_version']}`." in usage
    assert "transformers 4 reads" not in usage
    # nor for rotary settings per layer type (Gemma-3's), which it writes no transformers 4 keys for
    (folder / "tokenizer_config.json").write_text(json.dumps(saved))
    assert model_card.tokenizer_facts(folder)["transformers_4"]
    per_layer = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    (folder / "config.json").write_text(json.dumps({**written, "rope_parameters": per_layer}))
    assert not model_card.tokenizer_facts(folder)["transformers_4"]
    # the share of a head rotated, under the names transformers 4 reads (Phi-2's 0.4 was read as 0.5)
    from transformers import GPTNeoXConfig, PhiConfig

    from rm_lib.model.modeling import config_for_transformers_4

    for name, made, wanted in [("phi", PhiConfig(partial_rotary_factor=0.4, rope_theta=20000.0),
                                {"partial_rotary_factor": 0.4, "rope_theta": 20000.0}),
                               ("neox", GPTNeoXConfig(rotary_pct=0.5, rotary_emb_base=20000),
                                {"rotary_pct": 0.5, "rotary_emb_base": 20000})]:
        made.save_pretrained(tmp_path / name)
        read = AutoConfig.from_pretrained(tmp_path / name).to_dict()
        config_for_transformers_4(tmp_path / name)
        written = json.loads((tmp_path / name / "config.json").read_text())
        assert {k: written.get(k) for k in wanted} == wanted, name
        assert AutoConfig.from_pretrained(tmp_path / name).to_dict() == read


def test_a_gpt_neox_tokenizer_still_adds_the_end_token_once_saved_and_loaded_again(tmp_path):
    """transformers drops add_eos_token at load and GPT-NeoX's tokenizer (Pythia) rebuilds its
    post-processor from it: the release loaded without the EOS training read the reward at, and
    pipeline(text) was off by half a logit. The saved folder now loads with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForSequenceClassification, GPTNeoXTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["good film", "bad plot and awful acting"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    trained = json.loads(bpe.to_str())["model"]
    tok = GPTNeoXTokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]])
    end = tok.eos_token_id
    assert tok("good film")["input_ids"][-1] != end
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    save_model(GPTNeoXForSequenceClassification(config), tok, tmp_path / "rm")
    body = tok("good film", add_special_tokens=False)["input_ids"]
    assert AutoTokenizer.from_pretrained(tmp_path / "rm")("good film")["input_ids"] == [*body, end]
    assert tok("good film")["input_ids"] == body  # the tokenizer in use is left as it was


def test_a_remote_code_tokenizer_is_not_loaded_to_check_how_it_reloads(tmp_path, tiny_decoder, monkeypatch):
    """Loading it would run its code (and stop at transformers' prompt): it is saved as it is."""
    import transformers

    from rm_lib.model.modeling import reloads_as_saved

    tok = load_tokenizer(str(tiny_decoder))
    tok.save_pretrained(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    own = {k: v for k, v in json.loads(config.read_text()).items() if k not in ("is_local", "local_files_only")}
    config.write_text(json.dumps({**own, "auto_map": {"AutoTokenizer": ["x.Tok", None]}}))
    before = config.read_text()
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    reloads_as_saved(tok, tmp_path)
    assert config.read_text() == before


def test_a_chat_template_that_writes_the_eos_keeps_the_tokenizer_as_it_is_and_the_card_says_so(tiny_decoder,
                                                                                                 tmp_path):
    """Llama-2 and Mistral chat templates end each answer with the EOS: a tokenizer that added one more
    would read the reward at a second EOS. It is saved as it is, and the card asks for the end token."""
    from transformers import pipeline

    from rm_lib.evaluation.scoring import RewardScorer
    from rm_lib.model.modeling import released_tokenizer
    from rm_lib.publish import model_card

    tok = load_tokenizer(str(tiny_decoder))
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                         "{% endfor %}")
    assert released_tokenizer(tok, chat_template=True) is tok
    assert released_tokenizer(tok)("x")["input_ids"][-1] == tok.eos_token_id  # a template of rm_lib's own
    save_model(load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id), tok, tmp_path / "rm",
               chat_template=True)
    (tmp_path / "rm" / "rm_lib.json").write_text('{"template": "tokenizer"}')  # as train writes it
    facts = model_card.tokenizer_facts(tmp_path / "rm")
    assert facts["adds_end"] is False and facts["end_token"] == "</s>" and facts["template"] == "tokenizer"
    assert "the saved chat template\nwrites it after a whole conversation, and the tokenizer does not add it" in \
        model_card._text_rules(facts)
    assert "apply_chat_template" in model_card._text_rules(facts)
    # a template of rm_lib's own (the default model has no chat template): no chat-template advice
    simple = model_card._text_rules({"adds_end": True, "end_token": "[SEP]", "template": "simple_chat"})
    assert "rm_lib's `simple_chat`" in simple and "apply_chat_template" not in simple
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "good film"}]
    text = tok.apply_chat_template(chat, tokenize=False).removeprefix(tok.bos_token)  # as the card says
    piped = pipeline("text-classification", model=str(tmp_path / "rm"), function_to_apply="none")
    ours = RewardScorer(tmp_path / "rm", template="tokenizer").score([chat])[0]
    assert piped(text)[0]["score"] == pytest.approx(ours, abs=1e-5)
    assert piped("good film" + tok.eos_token)[0]["score"] == pytest.approx(
        RewardScorer(tmp_path / "rm").score(["good film"])[0], abs=1e-5)


def test_a_checkpoint_with_two_outputs_is_refused(tmp_path, minilm_path):
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).save_pretrained(tmp_path / "two")
    with pytest.raises(SettingsError, match="head with 2 outputs; a reward model needs exactly one"):
        load_reward_model(str(tmp_path / "two"))
    model = load_reward_model(minilm_path)
    assert model.config.num_labels == 1 and model.classifier.out_features == 1
    # a config that does not say it (no `architectures`, or one label over the 2-row head): the head's
    # weights say it, before any step runs (the load failed with a size-mismatch traceback after the data steps)
    config = json.loads((tmp_path / "two/config.json").read_text())
    for name, changed in (("noarch", {k: v for k, v in config.items() if k != "architectures"}),
                          ("onelabel", {**config, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}})):
        shutil.copytree(tmp_path / "two", tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(changed))
        with pytest.raises(SettingsError, match=r"head with 2 outputs \(model.safetensors: classifier.weight of "
                                                r"shape \[2, 384\]\); a reward model needs exactly one"):
            load_model_config(str(tmp_path / name))
    # another task's checkpoint whose head the sequence-classification class does not use (GPT-2's token
    # classifier keeps a `classifier`, its sequence classifier a `score`) gets a new head, as before
    from transformers import GPT2Config, GPT2ForTokenClassification

    GPT2ForTokenClassification(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32,
                                          num_labels=3)).save_pretrained(tmp_path / "tokens")
    assert load_reward_model(str(tmp_path / "tokens")).score.out_features == 1



def test_a_config_transformers_refuses_is_named_with_the_right_advice(tmp_path, minilm_path):
    """A config of one label and problem_type single_label_classification (which transformers refuses) was
    met with advice about custom model code; an unknown model_type is still pointed at trust_remote_code."""
    config = json.loads((Path(minilm_path) / "config.json").read_text())
    single = {**config, "problem_type": "single_label_classification", "id2label": {"0": "LABEL_0"},
              "label2id": {"LABEL_0": 0}}
    refused = "transformers refuses its config.json as it is; fix that file or name another model"
    custom = "Custom model code runs only with model.trust_remote_code=true"
    for name, changed, advice in (("single", single, refused),
                                  ("custom", {**config, "model_type": "my-own-model"}, custom)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(changed))
        with pytest.raises(SettingsError) as caught:
            load_model_config(str(tmp_path / name), weights=False)
        said = str(caught.value)
        assert said.startswith(f"model.name_or_path: cannot load '{tmp_path / name}' (") and said.endswith(advice)
        assert ("trust_remote_code" in said) is (name == "custom"), said


def test_a_model_without_a_classification_head_is_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4)).save_pretrained(tmp_path)
    with pytest.raises(SettingsError, match="sequence-classification head"):
        load_reward_model(str(tmp_path))


@contextlib.contextmanager
def transformers_log():
    """The messages transformers logs inside (its handler may write where no capture sees it)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep, logger = Keep(level=logging.WARNING), logging.getLogger("transformers")
    logger.addHandler(keep)
    try:
        yield seen
    finally:
        logger.removeHandler(keep)


def test_a_model_to_score_must_hold_its_trained_head(tmp_path, tiny_decoder, minilm_path, capfd):
    """A base model scored as a reward model would read a head that starts at random at each load:
    random rewards, other ones every time. It is refused, naming the weights it lacks."""
    from safetensors.torch import load_file, save_file

    from rm_lib.evaluation.scoring import RewardScorer

    # named by the scorer's own argument: the user set no model.name_or_path
    with pytest.raises(SettingsError, match="^model_dir: '.*' lacks trained weights for classifier.bias, classifier"):
        RewardScorer(minilm_path)
    tok = load_tokenizer(str(tiny_decoder))
    save_model(load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id), tok, tmp_path / "rm")
    assert load_reward_model(str(tmp_path / "rm"), trained=True).score.out_features == 1
    weights = load_file(tmp_path / "rm" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("score.")}, tmp_path / "rm" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(SettingsError, match="'.*rm' lacks trained weights for score.weight"):
        load_reward_model(str(tmp_path / "rm"), trained=True)
    # to train, the same folder loads: its head is new, and nothing is said of it
    capfd.readouterr()
    with transformers_log() as logged:
        load_reward_model(str(tmp_path / "rm"))
    out = capfd.readouterr()
    assert not logged and "Loading weights" not in out.err + out.out and "score" not in out.err
    with transformers_log() as logged:  # what the filter holds back, unfiltered: the measure can fail
        from transformers import AutoModelForSequenceClassification

        AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert any("LOAD REPORT" in m for m in logged)


def test_a_model_to_train_names_the_layers_beside_its_head_that_start_at_random(tmp_path, tiny_decoder, capfd):
    from safetensors.torch import load_file, save_file

    tok = load_tokenizer(str(tiny_decoder))
    save_model(load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id), tok, tmp_path / "rm")
    weights = load_file(tmp_path / "rm" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1.mlp" not in k}, tmp_path / "rm" / "model.safetensors",
              metadata={"format": "pt"})
    capfd.readouterr()
    with transformers_log() as logged:
        load_reward_model(str(tmp_path / "rm"))
    err = capfd.readouterr().err
    assert "has no weights for model.layers.1.mlp.down_proj.weight, model.layers.1.mlp.gate_proj.weight" in err
    assert "start at random" in err and not logged
    # under LoRA they train in full and are saved with the adapter, as the head: frozen at random, the
    # adapter would give other rewards on every base it is loaded onto
    model = add_lora(load_reward_model(str(tmp_path / "rm"), pad_token_id=tok.pad_token_id), r=2, alpha=4,
                     dropout=0.0, target_modules=["q_proj"])
    trained = {n for n, p in model.named_parameters() if "layers.1.mlp" in n and p.requires_grad}
    assert {n.split("mlp.")[1].split(".")[0] for n in trained} == {"gate_proj", "up_proj", "down_proj"}
    model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file as load_adapter

    saved = load_adapter(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("layers.1.mlp.down_proj" in k for k in saved)
    assert any(k.startswith("base_model.model.score") for k in saved)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_saves_the_head_and_reloads_with_identical_rewards(tmp_path, tiny_decoder, targets):
    """`all-linear` (peft's word, TRL's usual recipe): every linear layer of the backbone gets an adapter, and
    the score head stays one trained in full, not adapted."""
    from peft import PeftModel

    tok = load_tokenizer(str(tiny_decoder))
    model = add_lora(load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id), r=4, alpha=8, dropout=0.0,
                     target_modules=targets)
    adapted = {name.rsplit(".", 1)[-1] for name in model.peft_config["default"].target_modules}
    assert adapted == ({"q_proj", "v_proj"} if isinstance(targets, list) else
                       {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    assert "score" in model.peft_config["default"].modules_to_save
    ids = torch.tensor([[tok.bos_token_id, 7, 8, 9, tok.eos_token_id]])
    mask = torch.ones_like(ids)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):  # move both the adapters and the new head away from their initial values
        (-rewards(model, ids, mask).sum()).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        before = rewards(model, ids, mask).item()
    save_model(model, tok, tmp_path / "rm")
    with torch.no_grad():
        merged = rewards(load_reward_model(str(tmp_path / "rm")).eval(), ids, mask).item()
        base = load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id)
        adapter = PeftModel.from_pretrained(base, tmp_path / "rm" / "adapter").eval()
        via_adapter = rewards(adapter, ids, mask).item()
        fresh = rewards(load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id).eval(), ids, mask).item()
    assert merged == pytest.approx(before, abs=1e-5)
    assert via_adapter == pytest.approx(before, abs=1e-5)
    assert fresh != pytest.approx(before, abs=1e-3)  # a fresh head would give other rewards


def test_lora_on_a_bf16_base_is_merged_and_saved_in_fp32_so_no_update_rounds_away(tmp_path, tiny_decoder):
    """Merged into bf16 weights, a LoRA update below a weight's rounding step (most of one after a few
    AdamW steps) would round away: the released model would not be the trained one. Merged in fp32,
    it gives the adapter's rewards (on the base loaded in fp32) to fp32 rounding."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_decoder, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_decoder).save_pretrained(bf16)
    tok = load_tokenizer(str(bf16))
    model = add_lora(load_reward_model(str(bf16), pad_token_id=tok.pad_token_id), r=4, alpha=8, dropout=0.0,
                     target_modules=["q_proj", "v_proj"])
    ids = torch.tensor([[tok.bos_token_id, 7, 8, 9, 10, 11, tok.eos_token_id], [tok.bos_token_id, 12, 13, 14, 15, 16,
                                                                                 tok.eos_token_id]])
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(5):
        (rewards(model, ids, mask)[1] - rewards(model, ids, mask)[0]).backward()
        opt.step()
        opt.zero_grad()
    save_model(model.eval(), tok, tmp_path / "rm")
    saved = load_file(tmp_path / "rm" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    with torch.no_grad():
        merged = rewards(load_reward_model(str(tmp_path / "rm"), trained=True).eval(), ids, mask)
        base = load_reward_model(str(bf16), pad_token_id=tok.pad_token_id, dtype=torch.float32)
        adapter = rewards(PeftModel.from_pretrained(base, tmp_path / "rm" / "adapter").eval(), ids, mask)
    assert merged.tolist() == pytest.approx(adapter.tolist(), abs=1e-5)


@pytest.mark.parametrize("family", ["decoder", "encoder lacking its pooler"])
def test_lora_on_a_bf16_base_trains_its_head_and_new_layers_in_fp32(tmp_path, tiny_decoder, family):
    """peft copies the score head (and a layer the files lack) to train in the base's dtype: in bf16 an
    AdamW step of 1e-5 left most of the head's weights as they were. They now train in fp32, with or
    without autocast, and the bf16 backbone around them still gets bf16."""
    from transformers import AutoModelForCausalLM, BertConfig, BertModel

    folder = tmp_path / "bf16"
    if family == "decoder":
        AutoModelForCausalLM.from_pretrained(tiny_decoder, dtype=torch.bfloat16).save_pretrained(folder)
        targets, trained = ["q_proj", "v_proj"], ["score"]
    else:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        BertModel(config, add_pooling_layer=False).to(torch.bfloat16).save_pretrained(folder)
        targets, trained = ["query", "value"], ["classifier", "bert.pooler.dense"]
    base = load_reward_model(str(folder), pad_token_id=0)
    model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=targets)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert torch.bfloat16 in {p.dtype for p in model.parameters()}  # the frozen base stays as loaded
    copies = {name: p for name, p in model.named_parameters()
              if any(f"{t}.modules_to_save" in name for t in trained)}
    assert {name.split(".modules_to_save")[0].split("model.", 2)[-1] for name in copies} == set(trained)
    ids, mask = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]), torch.ones(2, 5, dtype=torch.long)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            scores = rewards(model, ids, mask)
        assert scores.dtype == torch.float32
        scores.sum().backward()  # (a Bradley-Terry pair's bias gradients cancel)
        before = {name: (p.detach().clone(), p.grad != 0) for name, p in copies.items()}
        opt.step()
        opt.zero_grad()
        for name, p in copies.items():  # AdamW moves every weight with a gradient by about the learning rate
            old, moved = before[name]
            assert moved.any() and (p != old)[moved].all(), name


FSDP2_LORA = """
import os, socket, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import LlamaConfig, LlamaForSequenceClassification
from rm_lib.model.batching import collate_pairs
from rm_lib.model.inference import PairScorer
from rm_lib.model.modeling import add_lora
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=64, num_labels=1, pad_token_id=0)
model = add_lora(LlamaForSequenceClassification(config).to(torch.bfloat16), r=2, alpha=4, dropout=0.0,
                 target_modules=None)
scorer, policy = PairScorer(model), MixedPrecisionPolicy(param_dtype=torch.bfloat16)
for layer in model.base_model.model.model.layers:
    fully_shard(layer, mp_policy=policy)
fully_shard(scorer, mp_policy=policy)
batch = collate_pairs([{"input_ids_chosen": [5, 6, 7], "input_ids_rejected": [8, 9]}], 0)
with torch.no_grad():  # as evaluation during training and the reward statistics score: no autocast
    print("scored", scorer(batch).tolist())
dist.destroy_process_group()
"""


def test_lora_on_a_bf16_base_scores_under_fsdp2_bf16_outside_autocast():
    """FSDP2 with bf16 mixed precision (configs/accelerate/fsdp.yaml on a GPU) gathers the fp32 head in
    bf16: an input cast to fp32 crashed the evaluations during training and the reward statistics."""
    import subprocess
    import sys

    from helpers import offline_env

    done = subprocess.run([sys.executable, "-c", FSDP2_LORA], capture_output=True, text=True, timeout=300,
                          env=offline_env())
    assert done.returncode == 0 and "scored" in done.stdout, done.stderr[-2000:]


def test_the_saved_lora_adapter_names_a_base_model_others_can_load(tmp_path, tiny_decoder):
    """Not the path the weights were read from on this machine (for 'default', inside site-packages): the
    Hub id and its revision, or a local folder's name only."""
    import json

    from rm_lib.model.modeling import base_model_reference

    assert base_model_reference("default") == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_reference("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert base_model_reference(str(tiny_decoder)) == tiny_decoder.name
    tok = load_tokenizer(str(tiny_decoder))
    model = add_lora(load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id), r=4, alpha=8, dropout=0.0,
                     target_modules=["q_proj"], base_model="org/base", revision="abc123")
    save_model(model, tok, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/base", "abc123")


def test_hub_kernels_stay_off_at_load_and_at_every_mode_switch(tiny_decoder, monkeypatch):
    """transformers would otherwise fetch layer code from the Hub on train()/eval(): unpinned, and an
    error on a GPU machine without network (seen at evaluation on an H200)."""
    import transformers.modeling_utils as modeling_utils

    def fetch(*args, **kwargs):
        raise AssertionError("hub kernels were asked for")

    monkeypatch.setattr(modeling_utils, "kernelize", fetch)
    tok = load_tokenizer(str(tiny_decoder))
    model = load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id)
    assert model.use_kernels is False
    model.eval()
    model.train()
    model.eval()


def test_a_decoder_reward_model_builds_no_kv_cache_and_scores_the_same(tiny_decoder, tmp_path):
    """A reward model never generates. With the config's cache on (as a decoder's is), every training
    and scoring forward would build a KV cache and copy each layer's keys and values into it."""
    from transformers import AutoConfig

    from rm_lib.model.packing import pack_pairs, packed_rewards

    assert AutoConfig.from_pretrained(tiny_decoder).use_cache is True
    tok = load_tokenizer(str(tiny_decoder))
    model = load_reward_model(str(tiny_decoder), pad_token_id=tok.pad_token_id).eval()
    assert model.config.use_cache is False
    pairs = [{"input_ids_chosen": [5, 6, 7, 8], "input_ids_rejected": [5, 6, 9]}]
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([[5, 6, 7]]))
        assert out.past_key_values is None
        got = packed_rewards(model, pack_pairs(pairs, tok.pad_token_id))
        model.config.use_cache = True
        cached = packed_rewards(model, pack_pairs(pairs, tok.pad_token_id))
    torch.testing.assert_close(got, cached)
    model.config.use_cache = False
    save_model(model, tok, tmp_path / "saved")
    assert AutoConfig.from_pretrained(tmp_path / "saved").use_cache is False


@pytest.mark.parametrize("kind, rates", [
    ("opt", {"word_embed_proj_dim": 32, "ffn_dim": 64, "dropout": 0.1, "layerdrop": 0.5}),  # F.dropout, LayerDrop
    ("bloom", {"n_layer": 2, "n_head": 4, "hidden_dropout": 0.1, "attention_dropout": 0.1}),
    ("falcon", {"hidden_dropout": 0.1, "attention_dropout": 0.1}),  # read from the config at each forward
    ("starcoder2", {"intermediate_size": 64, "num_key_value_heads": 2, "residual_dropout": 0.1,
                    "embedding_dropout": 0.1, "attention_dropout": 0.1}),
    ("llama", {"intermediate_size": 64, "attention_dropout": 0.1}),
])
def test_disabled_dropout_leaves_no_rate_in_training_and_the_saved_config_as_it_was(kind, rates):
    """train.disable_dropout (the default): two training-mode forwards of one input agree, whichever way
    the architecture applies its rates; the config that is saved with the model keeps them."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rm_lib.training.model_modes import dropout_disabled

    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = AutoConfig.for_model(kind, vocab_size=100, num_labels=1, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, **shape, **rates)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    saved = model.config.to_dict()
    x = torch.randint(3, 100, (1, 12))
    model.train()
    assert len({model(x).logits.item() for _ in range(6)}) > 1  # the rates are live before
    with dropout_disabled(model):
        assert len({model(x).logits.item() for _ in range(6)}) == 1
    assert model.config.to_dict() == saved  # the rates are back for the saved config


def test_disabled_dropout_keeps_the_lora_dropout_the_run_asked_for():
    """train.lora_dropout=0.5 under train.disable_dropout (the default) trained the same adapters as 0.0,
    while adapter_config.json, run.json and the card said 0.5."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rm_lib.model.modeling import add_lora
    from rm_lib.training.model_modes import dropout_disabled

    config = AutoConfig.for_model("llama", vocab_size=100, num_labels=1, pad_token_id=0, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  attention_dropout=0.1)
    torch.manual_seed(0)
    model = add_lora(AutoModelForSequenceClassification.from_config(config), r=4, alpha=8, dropout=0.5,
                     target_modules=None, base_model="tiny", revision=None)
    with dropout_disabled(model):
        rates = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
        assert rates and all(p == (0.5 if "lora_dropout" in name else 0.0) for name, p in rates.items())
        assert any("lora_dropout" in name for name in rates)
        assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.base_model.model.model.layers)
