import math

import pytest
import torch

from rlhf_cli.trainers.common import Batcher, make_scheduler, total_steps


def test_batcher_is_deterministic_and_covers_each_example_once_per_epoch():
    lengths = [(i * 7) % 13 + 1 for i in range(40)]
    a = Batcher(40, 4, seed=1, lengths=lengths)
    b = Batcher(40, 4, seed=1, lengths=lengths)
    epoch0 = [a.indices(p) for p in range(10)]
    assert epoch0 == [b.indices(p) for p in range(10)]
    assert sorted(i for batch in epoch0 for i in batch) == list(range(40))
    assert [a.indices(p) for p in range(10, 20)] != epoch0  # a new order each epoch


def test_batcher_resumes_at_any_position_without_replay():
    full = Batcher(30, 3, seed=5)
    seq = [full.indices(p) for p in range(25)]
    resumed = Batcher(30, 3, seed=5)
    assert [resumed.indices(p) for p in range(17, 25)] == seq[17:]


def test_group_by_length_pads_less():
    lengths = [1 + (i * 37) % 100 for i in range(800)]
    def padding(batcher):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in (batcher.indices(p) for p in range(batcher.batches_per_epoch)))
    assert padding(Batcher(800, 8, 0, lengths=lengths)) < 0.2 * padding(Batcher(800, 8, 0))


def test_ranks_get_disjoint_shards_of_one_global_batch():
    r0, r1 = Batcher(16, 2, 3, rank=0, world_size=2), Batcher(16, 2, 3, rank=1, world_size=2)
    for p in range(r0.batches_per_epoch):
        assert not set(r0.indices(p)) & set(r1.indices(p))


def lrs(kind: str, total: int, warmup: int) -> list[float]:
    from rlhf_cli.config import TrainConfig

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt, TrainConfig(scheduler=kind, warmup_steps=warmup), total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])  # the rate the next optimizer step uses
        opt.step()
        sched.step()
    return out


def test_lr_schedule_by_hand():
    # transformers' warmup starts from 0: steps 0, 1 of 2 warmup steps use 0/2 and 1/2 of the peak
    cos = lrs("cosine", 10, 2)
    assert cos[:3] == [0.0, 0.5, 1.0]
    assert abs(cos[6] - 0.5) < 1e-12  # halfway through the 8 decay steps: (1 + cos(pi/2)) / 2
    assert abs(cos[4] - 0.5 * (1 + math.cos(math.pi / 4))) < 1e-12
    assert abs(lrs("linear", 10, 2)[6] - 0.5) < 1e-12
    assert lrs("constant", 10, 2)[1:] == [0.5] + [1.0] * 8


def test_total_steps_from_epochs_and_accumulation():
    class T:
        max_steps, epochs, batch_size, gradient_accumulation_steps = None, 2.0, 4, 2
    assert total_steps(T, 100, 1) == (25, 25)  # 25 micro-batches per epoch, x2 epochs / 2 accumulation
    T.max_steps = 7
    assert total_steps(T, 100, 1)[0] == 7


def test_accumulated_loss_is_normalised_by_all_label_tokens():
    """Sum-NLL / total tokens over micro-batches equals the loss of one big batch."""
    from rlhf_cli.losses.sft import sft_loss

    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7)
    labels = torch.tensor([[-100, 1, 2, -100, -100], [-100, 3, 4, 5, 6], [-100, -100, 1, -100, -100],
                           [-100, 2, 2, 2, -100]])
    whole = sft_loss(logits, labels)
    halves = [sft_loss(logits[:2], labels[:2]), sft_loss(logits[2:], labels[2:])]
    n = sum(h.num_tokens for h in halves)
    accumulated = sum(h.loss_sum / n for h in halves)
    assert torch.allclose(accumulated, whole.loss_sum / whole.num_tokens, atol=1e-6, rtol=0)
    # the per-micro-batch mean (the old bug) differs when micro-batches have different token counts
    naive = sum(h.loss_sum / h.num_tokens for h in halves) / 2
    assert not torch.allclose(naive, accumulated, atol=1e-4, rtol=0)


if __name__ == "__main__":
    pytest.main([__file__])
