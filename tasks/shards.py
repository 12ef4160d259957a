"""Group networks into shards: the networks one task trains together."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardPlan:
    """The networks one chain of iteration tasks trains, by series id."""

    shard_id: int
    series_ids: tuple[str, ...]


def plan_fixed_shards(series_ids: list[str], shard_size: int) -> list[ShardPlan]:
    """Cut `series_ids` into consecutive shards of `shard_size` (the last may be smaller).

    shard_size=1 gives one task per network iteration.
    """
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1 (1 = one task per network); got {shard_size!r}")
    return [
        ShardPlan(shard_id, tuple(series_ids[start : start + shard_size]))
        for shard_id, start in enumerate(range(0, len(series_ids), shard_size))
    ]


def split_shard(series_ids: tuple[str, ...], first_new_id: int) -> list[ShardPlan]:
    """Halve a shard that ran out of memory: two shards with fresh ids (one if it has one network)."""
    if not series_ids:
        return []
    middle = (len(series_ids) + 1) // 2
    halves = [series_ids[:middle], series_ids[middle:]]
    return [ShardPlan(first_new_id + i, half) for i, half in enumerate(h for h in halves if h)]
