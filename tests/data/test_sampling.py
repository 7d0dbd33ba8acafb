"""BatchPlan: the order of examples and batches (length groups, token budgets, resume, shards per process)."""

import numpy as np

from mlm_lightning.data.sampling import BatchPlan


def test_plan_covers_every_example_once_and_groups_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 128, size=1000)
    for kw in ({}, {"max_tokens": 1024}):
        plan = BatchPlan(lengths, 16, seed=3, **kw)
        for epoch in range(2):
            plan.set_epoch(epoch)
            seen = [i for batch in plan for _, i in batch]
            assert sorted(seen) == list(range(1000))
    grouped = BatchPlan(lengths, 16, seed=3)
    random = BatchPlan(lengths, 16, seed=3, group_by_length=False)

    def pad_share(plan):
        batches = [[i for _, i in b] for b in plan]
        padded = sum(len(b) * lengths[b].max() for b in batches)
        return 1 - lengths.sum() / padded

    assert pad_share(grouped) < pad_share(random) / 3
    budget = BatchPlan(lengths, 16, seed=3, max_tokens=1024)
    assert all(len(b) * lengths[[i for _, i in b]].max() <= 1024 for b in budget)
    a, b = BatchPlan(lengths, 16, seed=3), BatchPlan(lengths, 16, seed=3)
    b.set_epoch(1)
    assert [x for x in a][0] != [x for x in b][0]  # new order each epoch


def test_plan_resume_and_shards():
    lengths = np.full(100, 8)
    full = [b for b in BatchPlan(lengths, 8, seed=1)]
    plan = BatchPlan(lengths, 8, seed=1)
    plan.resume(0, 5)
    assert [b for b in plan] == full[5:]
    assert [b for b in plan] == full  # only the first iteration skips
    shards = [list(BatchPlan(lengths, 8, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])  # DDP ranks step in lockstep
    assert not {i for b in shards[0] for _, i in b} & {i for b in shards[1] for _, i in b}


def test_evaluation_shards_cover_every_example():
    lengths = np.arange(4, 25)  # 21 examples, 2 processes
    shards = [list(BatchPlan(lengths, 4, shuffle=False, num_replicas=2, rank=r)) for r in (0, 1)]
    seen = sorted(i for shard in shards for b in shard for _, i in b)
    assert seen == list(range(21))
