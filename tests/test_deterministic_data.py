"""Deterministic training streams (`data.deterministic`): every worker's batches are a pure
function of the shards and the seed, the same run after run, and the same as `local_stream`
(the Ray-free copy that benchmarks/reference.py trains on)."""

from __future__ import annotations

import numpy as np
import pytest

from srplatform.data.pipeline import (
    batch_plan,
    local_stream,
    read_shard,
    shard_order,
    shard_uris,
    train_dataset,
)
from tests.test_pipeline import PATCH, ray_local, tiny_pack  # noqa: F401 (fixtures)


def read_shards(uri: str) -> list[list[dict]]:
    return [read_shard(shard) for shard in shard_uris(uri)]


def test_batch_plan_covers_every_batch_once_and_balances_workers():
    counts = [12, 12, 5, 12]
    plan = list(batch_plan(counts, batch_size=4, seed=7, epoch=3, epochs=2, crops=2, world=3))
    per_epoch = 2 * (3 + 3 + 2 + 3)
    assert len(plan) == 2 * per_epoch
    assert [p[5] for p in plan] == [g % 3 for g in range(len(plan))]
    for ep in (3, 4):
        shards = [p[1] for p in plan if p[0] == ep and p[2] == 0 and p[3] == 0]
        assert shards == shard_order(4, 7, ep) and sorted(shards) == [0, 1, 2, 3]
        rows = sorted((p[1], p[2], p[3], p[4]) for p in plan if p[0] == ep)
        assert sum(b - a for _, _, a, b in rows) == 2 * sum(counts)
    assert shard_order(4, 7, 3) != shard_order(4, 7, 4) or shard_order(4, 7, 5) != shard_order(4, 7, 3)


@pytest.mark.integration
@pytest.mark.slow
def test_deterministic_stream_repeats_and_matches_local_stream(ray_local, tiny_pack):  # noqa: F811
    uri = str(tiny_pack["pack"])
    opts = dict(patch=PATCH, batch_size=4, seed=5, epoch=1, epochs=2, crops=2, num_cpus=0.5)
    shards = read_shards(uri)
    assert len(shards) >= 4
    for rank in range(2):
        got = []
        for _ in range(2):
            ds = train_dataset(uri, deterministic=True, rank=rank, world=2, **opts)
            got.append([{k: v.numpy() for k, v in b.items()}
                        for b in ds.iter_torch_batches(batch_size=4, drop_last=True)])
        local = list(local_stream(shards, rank=rank, world=2, patch=PATCH, batch_size=4, seed=5,
                                  epoch=1, epochs=2, crops=2, passes=1))
        assert len(got[0]) == len(got[1]) == len(local) >= 5
        for a, b, c in zip(got[0], got[1], local):
            for k in ("lr", "hr", "hr_size", "epoch"):
                np.testing.assert_array_equal(a[k], b[k])
                np.testing.assert_array_equal(a[k], c[k])
