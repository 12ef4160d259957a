"""Group networks into shards: the networks one chain of iteration tasks trains together.

Fixed shards cut the networks in input order. Planned shards ("auto") come from the cost model:
networks are packed longest first into the shard whose predicted chain stays shortest, for a
number of shards chosen by simulating each candidate plan on the cluster's workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models import ModelSpec
from tasks.cost_model import CostModel, describe_task, device_kind, effective_strategy, macs_per_window
from tasks.schedule import lower_bound, makespan, priority_of, simulate


@dataclass(frozen=True)
class ShardPlan:
    """The networks one chain of iteration tasks trains, by series id, and their spec if not the run's."""

    shard_id: int
    series_ids: tuple[str, ...]
    spec: ModelSpec | None = None


@dataclass(frozen=True)
class NetworkLoad:
    """One network as the planner sees it: its spec and how many training windows its series has."""

    series_id: str
    spec: ModelSpec
    train_windows: int

    def rows(self, iteration: int) -> int:
        return self.spec.training_rows(self.train_windows, iteration)


@dataclass
class PlanSummary:
    """Why a plan was chosen: its predicted makespan and overhead against the other candidates."""

    shards: int
    predicted_makespan: float
    lower_bound: float
    overhead_share: float
    candidates: list[dict] = field(default_factory=list)


def check_shard_size(shard_size) -> None:
    """Reject a shard size that is neither "auto" nor an integer >= 1, naming the fix."""
    if shard_size == "auto":
        return
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValueError(
            f"shard_size must be 'auto' (planned from the cost model) or an integer >= 1 "
            f"(1 = one task per network); got {shard_size!r}"
        )


def plan_fixed_shards(series_ids: list[str], shard_size: int, spec: ModelSpec | None = None,
                      first_id: int = 0) -> list[ShardPlan]:  # fmt: skip
    """Cut `series_ids` into consecutive shards of `shard_size` (the last may be smaller).

    shard_size=1 gives one task per network iteration.
    """
    check_shard_size(shard_size)
    if shard_size == "auto":
        raise ValueError("plan_fixed_shards needs an integer shard_size; 'auto' is planned by plan_auto_shards")
    return [
        ShardPlan(first_id + number, tuple(series_ids[start : start + shard_size]), spec)
        for number, start in enumerate(range(0, len(series_ids), shard_size))
    ]


def split_shard(series_ids: tuple[str, ...], first_new_id: int, spec: ModelSpec | None = None) -> list[ShardPlan]:
    """Halve a shard that ran out of memory: two shards with fresh ids (one if it has one network)."""
    if not series_ids:
        return []
    middle = (len(series_ids) + 1) // 2
    halves = [series_ids[:middle], series_ids[middle:]]
    return [ShardPlan(first_new_id + i, half, spec) for i, half in enumerate(h for h in halves if h)]


def group_by_spec(networks: list[NetworkLoad]) -> dict[ModelSpec, list[NetworkLoad]]:
    """Networks by spec, in first-seen order: a shard only ever holds networks of one spec."""
    groups: dict[ModelSpec, list[NetworkLoad]] = {}
    for network in networks:
        groups.setdefault(network.spec, []).append(network)
    return groups


def chain_costs(members: list[NetworkLoad], iterations: int, model: CostModel, overhead: float, strategy: str,
                device: str, first_iteration: int = 1) -> list[float]:  # fmt: skip
    """Predicted seconds (overhead included) of each remaining iteration task of one shard."""
    if not members:
        return []
    spec = members[0].spec
    return [
        model.predict(describe_task([m.rows(k) for m in members], spec, strategy, device, model.widths)) + overhead
        for k in range(first_iteration, iterations + 1)
    ]


def _pack(networks: list[NetworkLoad], shards: int, iterations: int, coefficients: np.ndarray, overhead: float,
          fused: bool) -> list[list[NetworkLoad]]:  # fmt: skip
    """Greedy longest-first packing of one spec's networks into `shards` shards by predicted chain cost."""
    spec = networks[0].spec
    c_task, c_network, c_work, c_step = coefficients
    epochs, work_unit = spec.epochs_per_iteration, spec.epochs_per_iteration * macs_per_window(spec)
    rows = np.array([[n.rows(k) for k in range(1, iterations + 1)] for n in networks], dtype=float)
    batches = np.ceil(rows / spec.batch_size)
    solo = (c_network + c_work * work_unit * rows + c_step * epochs * batches).sum(axis=1)
    count = np.zeros(shards)
    sum_rows = np.zeros((shards, iterations))
    steps = np.zeros((shards, iterations))
    members: list[list[NetworkLoad]] = [[] for _ in range(shards)]
    # chain_costs' arithmetic, for every candidate shard at once: one predict call per shard and
    # network would make planning 1660 networks take seconds.
    for i in np.argsort(-solo, kind="stable"):
        new_steps = np.maximum(steps, batches[i]) if fused else steps + batches[i]
        cost = (iterations * (c_task + overhead) + iterations * c_network * (count + 1)
                + c_work * work_unit * (sum_rows + rows[i]).sum(axis=1) + c_step * epochs * new_steps.sum(axis=1))
        target = int(np.argmin(cost))
        count[target] += 1
        sum_rows[target] += rows[i]
        steps[target] = new_steps[target]
        members[target].append(networks[i])
    return [m for m in members if m]


def plan_auto_shards(
    networks: list[NetworkLoad], iterations: int, workers: int, model: CostModel, overhead: float,
    strategy: str, device: str, max_overhead_share: float = 0.10, shards_per_worker: int = 3,
) -> tuple[list[ShardPlan], PlanSummary]:  # fmt: skip
    """Shards planned from predicted costs: balanced, several per worker, overhead under its share.

    Candidate shard counts (multiples of `workers`) are each packed and simulated with cost-model
    priorities on `workers` workers; the one with the smallest predicted makespan wins among those
    with at least `shards_per_worker` shards per worker and a Prefect + Dask overhead below
    `max_overhead_share` of the work (constraints are dropped in that order when none meets both).
    """
    if not networks:
        return [], PlanSummary(0, 0.0, 0.0, 0.0)
    groups = group_by_spec(networks)
    solo_totals = {
        spec: sum(sum(chain_costs([n], iterations, model, 0.0, strategy, device)) for n in members)
        for spec, members in groups.items()
    }
    grand_total = sum(solo_totals.values()) or 1.0
    counts = sorted({min(len(networks), workers * m) for m in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)})
    candidates = []
    for total_shards in counts:
        packed: list[tuple[ModelSpec, list[NetworkLoad]]] = []
        for spec, members in groups.items():
            share = max(1, min(len(members), round(total_shards * solo_totals[spec] / grand_total)))
            fused = effective_strategy(spec, strategy) == "fused"
            key = (spec.architecture, effective_strategy(spec, strategy), device_kind(device))
            packed += [(spec, m) for m in _pack(members, share, iterations, model.coefficients(key), overhead, fused)]
        chains = [chain_costs(m, iterations, model, overhead, strategy, device) for _, m in packed]
        work = sum(sum(c) for c in chains)
        tasks = sum(len(c) for c in chains)
        candidates.append({
            "shards": len(packed), "predicted_makespan": makespan(simulate(chains, workers, "priority")),
            "lower_bound": lower_bound(chains, workers), "overhead_share": tasks * overhead / work if work else 0.0,
            "plan": packed,
        })  # fmt: skip
    enough = min(len(networks), shards_per_worker * workers)
    for keep in (
        lambda c: c["overhead_share"] <= max_overhead_share and c["shards"] >= enough,
        lambda c: c["overhead_share"] <= max_overhead_share,
        lambda c: True,
    ):
        feasible = [c for c in candidates if keep(c)]
        if feasible:
            break
    best_time = min(c["predicted_makespan"] for c in feasible)
    # Within 1% of the best, fewer shards: less overhead and bigger fused batches for the same time.
    chosen = min((c for c in feasible if c["predicted_makespan"] <= best_time * 1.01), key=lambda c: c["shards"])
    shards = [ShardPlan(i, tuple(n.series_id for n in members), spec) for i, (spec, members) in enumerate(chosen["plan"])]
    summary = PlanSummary(chosen["shards"], chosen["predicted_makespan"], chosen["lower_bound"], chosen["overhead_share"],
                          [{k: v for k, v in c.items() if k != "plan"} for c in candidates])  # fmt: skip
    return shards, summary


def choose_strategies(
    networks: list[NetworkLoad], iterations: int, workers: int, model: CostModel, overhead: float, device: str,
    strategies: Sequence[str] = ("one_by_one", "fused"),
) -> dict[str, dict]:  # fmt: skip
    """Per architecture, the strategy whose planned shards the cost model predicts to finish first.

    Each strategy the model knows for an architecture (from this run's calibration or earlier
    runs' timings) is planned as `plan_auto_shards` would plan it and simulated; the shortest
    predicted makespan wins. Returns {architecture: {"strategy": chosen, "predicted_makespan":
    {strategy: seconds}}}; an architecture the model knows no strategy of trains one by one.
    """
    choices = {}
    for spec, members in group_by_spec(networks).items():
        predicted = {}
        for strategy in strategies:
            if model.knows((spec.architecture, effective_strategy(spec, strategy), device_kind(device))):
                summary = plan_auto_shards(members, iterations, workers, model, overhead, strategy, device)[1]
                predicted[strategy] = summary.predicted_makespan
        best = min(predicted, key=predicted.__getitem__) if predicted else "one_by_one"
        choices[spec.architecture] = {"strategy": best, "predicted_makespan": predicted}
    return choices


def forecast(members: list[NetworkLoad], iteration: int, iterations: int, model: CostModel, overhead: float,
             strategy: str, device: str) -> tuple[float | None, int | None]:  # fmt: skip
    """(predicted seconds of the shard's task at `iteration`, Dask priority = its remaining chain in ms).

    (None, None) while the model knows nothing of this shard's kind of task yet.
    """
    if not members:
        return None, None
    key = (members[0].spec.architecture, effective_strategy(members[0].spec, strategy), device_kind(device))
    if not model.knows(key):
        return None, None
    costs = chain_costs(members, iterations, model, overhead, strategy, device, first_iteration=iteration)
    return costs[0] - overhead, priority_of(costs, 1)
