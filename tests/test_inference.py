import random
import threading
from types import SimpleNamespace

import pytest
import torch

from rm_lib.model import inference
from rm_lib.model.inference import score_pairs, score_pairs_across, shard, unshard
from rm_lib.model.modeling import load_reward_model


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (10, 3), (5, 8)])
def test_shards_are_equal_in_size_and_unshard_restores_the_order(n, world):
    rows = [{"id": i} for i in range(n)]
    shares = [shard(rows, rank, world) for rank in range(world)]
    assert len({len(share) for share, _ in shares}) == 1  # every process runs as many batches
    assert sum(real for _, real in shares) == n  # and no row is scored twice
    assert unshard([share[:real] for share, real in shares], world) == rows


def test_each_process_scores_its_share_and_all_get_every_reward(tiny_decoder, monkeypatch):
    model = load_reward_model(str(tiny_decoder), pad_token_id=0)
    rng = random.Random(0)
    rows = [{"input_ids_chosen": [rng.randrange(1, 90) for _ in range(rng.randrange(3, 20))],
             "input_ids_rejected": [rng.randrange(1, 90) for _ in range(rng.randrange(3, 20))]} for _ in range(11)]
    alone = score_pairs(model, rows, pad_token_id=0, batch_size=4)

    # two "processes" as threads, joined by a gather that swaps what each sends
    world, barrier, sent, scored, results = 2, threading.Barrier(2), {}, {}, {}
    rank_of = {}

    def gather(obj):
        sent[rank_of[threading.get_ident()]] = obj
        barrier.wait()
        return [x for rank in range(world) for x in sent[rank]]

    real_collate = inference.collate_sequences

    def counting_collate(seqs, *args, **kwargs):
        scored[rank_of[threading.get_ident()]] += len(seqs)
        return real_collate(seqs, *args, **kwargs)

    monkeypatch.setattr("accelerate.utils.gather_object", gather)
    monkeypatch.setattr(inference, "collate_sequences", counting_collate)

    def process(rank):
        rank_of[threading.get_ident()] = rank
        scored[rank] = 0
        accelerator = SimpleNamespace(num_processes=world, process_index=rank, device=torch.device("cpu"))
        results[rank] = score_pairs_across(accelerator, model, rows, pad_token_id=0, batch_size=4)

    threads = [threading.Thread(target=process, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert scored == {0: 12, 1: 12}  # 11 pairs: 6 and 5, the short share padded with one copy; two texts each
    for rank in range(world):
        assert results[rank][0] == pytest.approx(alone[0], abs=1e-5)
        assert results[rank][1] == pytest.approx(alone[1], abs=1e-5)


def scarce(real, most: int):
    """`real` (a scoring function of a model and ids) on a device that runs out of memory for more
    than `most` sequences a batch; records each batch's size."""
    sizes = []

    def score(model, input_ids, *args, **kwargs):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > most:
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return real(model, input_ids, *args, **kwargs)

    return score, sizes


def test_a_batch_out_of_gpu_memory_is_scored_again_in_halves(tiny_decoder, monkeypatch, capsys):
    """Evaluation holds nothing between batches: a batch that does not fit is scored in halves, and
    the rest of the pairs too, with the rewards of a device that had the room."""
    model = load_reward_model(str(tiny_decoder), pad_token_id=0)
    rng = random.Random(1)
    rows = [{"input_ids_chosen": [rng.randrange(1, 90) for _ in range(rng.randrange(3, 20))],
             "input_ids_rejected": [rng.randrange(1, 90) for _ in range(rng.randrange(3, 20))]} for _ in range(13)]
    roomy = score_pairs(model, rows, pad_token_id=0, batch_size=8)
    score, sizes = scarce(inference.rewards, most=6)  # 6 texts: a batch of 16 (8 pairs) is halved twice
    monkeypatch.setattr(inference, "rewards", score)
    tight = score_pairs(model, rows, pad_token_id=0, batch_size=8)
    for got, expected in zip(tight, roomy):
        assert got == pytest.approx(expected, abs=1e-5)
    assert sizes[:3] == [16, 8, 4] and set(sizes[3:]) <= {4, 2}  # 4 texts a batch from then on
    assert "scoring pairs: out of GPU memory in a batch of 16 texts; on in batches of 8" in capsys.readouterr().err


def test_out_of_gpu_memory_for_one_pair_or_on_several_processes_names_the_setting(tiny_decoder, monkeypatch):
    from rm_lib.errors import DevicePathError

    model = load_reward_model(str(tiny_decoder), pad_token_id=0)
    model.train()
    rows = [{"input_ids_chosen": [5, 6, 7], "input_ids_rejected": [5, 8]}] * 4
    score, _ = scarce(inference.rewards, most=0)  # not even one text
    monkeypatch.setattr(inference, "rewards", score)
    with pytest.raises(DevicePathError, match="scoring pairs: out of GPU memory scoring a batch of 1 text; a single "
                                              "text does not fit: free GPU memory, or score shorter texts"):
        score_pairs(model, rows, pad_token_id=0, batch_size=4)
    assert model.training  # the model leaves in the mode it came in, also on an error
    score, _ = scarce(inference.rewards, most=4)
    monkeypatch.setattr(inference, "rewards", score)
    with pytest.raises(DevicePathError, match="batch of 8 texts on one of several processes, which score in step"):
        score_pairs(model, rows, pad_token_id=0, batch_size=4, shrink_on_oom=False)


def test_fsdp_wraps_each_transformer_layer_of_the_scored_model(tiny_decoder):
    """accelerate's transformer wrap policy reads the layer classes off the module it prepares, the
    PairScorer: without them FSDP would gather the whole model for every forward."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model = load_reward_model(str(tiny_decoder), pad_token_id=0)
    scorer = inference.PairScorer(model)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, scorer)
    wrapped = [type(m).__name__ for m in scorer.modules() if policy(m)]
    assert wrapped and set(wrapped) == set(model._no_split_modules)
    assert len(wrapped) == model.config.num_hidden_layers
