"""tokenize: normalised pairs -> token ids, through the chosen chat template."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rm_lib.data import keys, templates, tokenization
from rm_lib.data.tokenstore import write_batches
from rm_lib.errors import DataError
from rm_lib.files import atomic_dir, read_json, read_jsonl, tree_sha256, write_json, write_jsonl
from rm_lib.layout import SPLITS, Layout
from rm_lib.model.modeling import load_model_config, load_tokenizer, max_sequence_length, resolve_model_path
from rm_lib.pipeline import chain
from rm_lib.pipeline.code_version import write_code_record
from rm_lib.progress import Progress
from rm_lib.settings import Params


@dataclass
class TokenizeResult:
    template: str
    rows: dict[str, int]
    tokens: dict[str, int]
    content_hash: str
    output_dir: Path
    model: str
    special_prefix: list[int]
    end_token_id: int | None
    pad_token_id: int | None
    inputs: dict[str, str]  # the content hashes of what these ids were made from
    max_length: int | None = None  # the most tokens the model reads (None: it does not say)
    settings: dict = field(default_factory=dict)  # the tokenize settings these ids were made with
    revision: str | None = None  # model.revision: the tokenizer's, with `model`
    template_start_id: int | None = None  # SpecialTokens.template_start: a BOS the template writes, kept by a cut
    # pairs per split whose rendering lacks the text of a system or user turn of their prompt
    prompts_left_out: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # pairs per split the chat template refused, set aside
    first_refusal: str = ""  # the template's words for the first of them
    refused_file: Path | None = None  # where they are (Layout.refused)

    def manifest(self) -> dict:
        """manifest.json: what filter, train and the model card read of this tokenization."""
        return {"model": self.model, "template": self.template, "rows": self.rows, "tokens": self.tokens,
                "special_prefix": self.special_prefix, "end_token_id": self.end_token_id,
                "pad_token_id": self.pad_token_id, "content_hash": self.content_hash, "inputs": self.inputs,
                "max_length": self.max_length, "settings": self.settings, "revision": self.revision,
                "template_start_id": self.template_start_id, "prompts_left_out": self.prompts_left_out,
                "refused_by_template": self.refused}

    def summary(self) -> str:
        left = sum(self.prompts_left_out.values())
        return (f"tokenize: template {self.template}; train {self.rows['train']} / test {self.rows['test']} pairs, "
                f"{self.tokens['train'] + self.tokens['test']} tokens -> {self.output_dir}"
                + (f"\nwarning: the chat template leaves the text of a system or user turn out of {left} pair(s) "
                   f"({self.prompts_left_out.get('train', 0)} train, {self.prompts_left_out.get('test', 0)} test): "
                   "the model trains and is evaluated on them without it (Mistral v0.3's template writes a system "
                   "turn only into a last user turn, never before an answer); keep it with "
                   "tokenize.template=chatml or simple_chat, or fold it into the first user turn"
                   if left else "")
                + (f"\nwarning: the chat template refused {sum(self.refused.values())} pair(s) "
                   f"({self.refused.get('train', 0)} train, {self.refused.get('test', 0)} test), set aside in "
                   f"{self.refused_file} with its words; the first: {self.first_refusal}"
                   if sum(self.refused.values()) else ""))


def _model_config(params: Params):
    return load_model_config(params.model.name_or_path, revision=params.model.revision,
                             trust_remote_code=params.model.trust_remote_code, weights=False)


def vocab_size(params: Params, tokenizer) -> int:
    """How many embedding rows the model has (what pretokenized ids index); the tokenizer's length otherwise."""
    return getattr(_model_config(params).get_text_config(), "vocab_size", None) or len(tokenizer)


def _recorded_template(name_or_path: str) -> str | None:
    """The template a local reward model this project trained records (its rm_lib.json; the scorer reads
    the whole record with evaluation.scoring.training_record, which this step's code does not take in):
    training on from it renders as its first training did (its release carries no chat template of the
    base's that training did not use)."""
    record = Path(resolve_model_path(name_or_path)) / "rm_lib.json"
    saved = read_json(record) if record.is_file() else {}
    return saved.get("template") if isinstance(saved, dict) else None


def prompt_digests(pairs: dict[str, list[dict]]) -> dict[str, list[str]]:
    """Each pair's prompt as the split grouped it (keys.prompt_keys over both splits: for pretokenized
    pairs the tokens every pair begins with are no prompt), digested: the model records the prompts it
    trained on by them, and evaluate compares the held-out ones."""
    found = [keys.digest(k) for k in keys.prompt_keys(pairs["train"] + pairs["test"])]
    return {"train": found[:len(pairs["train"])], "test": found[len(pairs["train"]):]}


def _digested(batches: Iterator[list[dict]], digests: dict[str, str], progress: Progress,
              tally: list[int]) -> Iterator[list[dict]]:
    """The batches with each row's prompt digest (by its pair's id: a pair the template refused has no
    row), their tokens added to tally[0] and the rows whose prompt the template left out in part to
    tally[1], written as they come: a large split is never all in memory."""
    done = 0
    for rows in batches:
        for row in rows:
            row["prompt_digest"] = digests[row["id"]]
            tally[1] += bool(row.pop("prompt_left_out", False))
        done += len(rows)
        tally[0] += sum(len(r["input_ids_chosen"]) + len(r["input_ids_rejected"]) for r in rows)
        progress(done)
        yield rows


def run(params: Params, layout: Layout) -> TokenizeResult:
    made_from = chain.inputs(layout, "pairs")  # the download step finished; recorded as what these ids come from
    tokenizer = load_tokenizer(params.model.name_or_path, revision=params.model.revision,
                               trust_remote_code=params.model.trust_remote_code)
    recorded = _recorded_template(params.model.name_or_path)
    template = templates.resolve(params.tokenize.template, tokenizer, recorded=recorded)
    special = tokenization.special_tokens(tokenizer)
    counts, tokens, left_out, refused = {}, {}, {}, {split: [] for split in SPLITS}
    read = {split: read_jsonl(layout.pairs / f"{split}.jsonl") for split in SPLITS}
    digests = prompt_digests(read)
    with atomic_dir(layout.tokenized) as out:
        for split in SPLITS:
            source, pairs = layout.pairs / f"{split}.jsonl", read[split]
            if any("input_ids_chosen" in p for p in pairs):  # pretokenized ids bypass the tokenizer: check them
                tokenization.check_token_ids(pairs, vocab_size(params, tokenizer), file=str(source))
            batches = tokenization.tokenize_batches(pairs, tokenizer, template, batch_size=params.tokenize.batch_size,
                                                    num_proc=params.tokenize.num_proc,
                                                    tokenizer_path=resolve_model_path(params.model.name_or_path),
                                                    refused=refused[split])
            progress = Progress(f"tokenize {split}", len(pairs), "pairs", note="")
            tally = [0, 0]  # the split's tokens and rows with a prompt left out, counted as its rows go by
            # closed here when the writing fails (a full disk): its workers stop now, not when the garbage
            # collector gets to it (on the pool's own thread, which cannot join itself)
            with contextlib.closing(batches):
                by_id = dict(zip((p["id"] for p in pairs), digests[split]))
                counts[split] = write_batches(out / f"{split}.parquet", _digested(batches, by_id, progress, tally))
            tokens[split], left_out[split] = tally
            if pairs and not counts[split]:  # every pair refused: the template's own words for the first
                raise DataError(f"the chat template refused every {split} pair; the first: {refused[split][0]['why']}",
                                file=str(source))
        write_jsonl(out / layout.refused.name, [dict(r, split=split) for split in SPLITS for r in refused[split]])
        result = TokenizeResult(
            template=template, rows=counts, tokens=tokens,
            content_hash=tree_sha256(out, [f"{s}.parquet" for s in SPLITS]), output_dir=layout.tokenized,
            model=params.model.name_or_path, revision=params.model.revision, special_prefix=list(special.prefix),
            end_token_id=special.end, template_start_id=special.template_start,
            pad_token_id=tokenizer.pad_token_id, inputs=made_from, settings=asdict(params.tokenize),
            prompts_left_out=left_out, refused={split: len(refused[split]) for split in SPLITS},
            refused_file=layout.refused,
            first_refusal=next((r["why"] for split in SPLITS for r in refused[split]), ""),
            max_length=max_sequence_length(_model_config(params), tokenizer))
        write_json(out / "manifest.json", result.manifest())
        write_code_record(out, "tokenize")
    return result
