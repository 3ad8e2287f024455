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

    real_collate = inference.collate_pairs

    def counting_collate(batch_rows, *args, **kwargs):
        scored[rank_of[threading.get_ident()]] += len(batch_rows)
        return real_collate(batch_rows, *args, **kwargs)

    monkeypatch.setattr("accelerate.utils.gather_object", gather)
    monkeypatch.setattr(inference, "collate_pairs", counting_collate)

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
    assert scored == {0: 6, 1: 6}  # 11 rows: 6 and 5, the short share padded with one copy
    for rank in range(world):
        assert results[rank][0] == pytest.approx(alone[0], abs=1e-5)
        assert results[rank][1] == pytest.approx(alone[1], abs=1e-5)
