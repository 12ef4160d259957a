"""Chains of iteration tasks on identical workers: priorities, a list-scheduling simulator, bounds.

The same simulator serves the shard planner (to compare candidate plans before anything runs) and
the scheduling benchmark (to replay recorded task costs on a virtual cluster of any size).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

POLICIES = ("fifo", "priority")


def remaining_work(costs: list[float], iteration: int) -> float:
    """Seconds left in a chain from iteration `iteration` (1-based) to its end, that one included."""
    return float(sum(costs[iteration - 1 :]))


def priority_of(costs: list[float], iteration: int) -> int:
    """The Dask priority of a chain's task: its remaining work in milliseconds (higher runs first)."""
    return int(round(remaining_work(costs, iteration) * 1000))


def lower_bound(chains: list[list[float]], workers: int) -> float:
    """No schedule finishes sooner than max(total work / workers, longest chain)."""
    total = sum(sum(c) for c in chains)
    return max(total / max(workers, 1), max((sum(c) for c in chains), default=0.0))


@dataclass(frozen=True)
class Scheduled:
    """One task of a simulated schedule."""

    chain: int
    iteration: int
    worker: int
    start: float
    end: float


def simulate(chains: list[list[float]], workers: int, policy: str = "priority") -> list[Scheduled]:
    """List-schedule chains of tasks (iteration k+1 ready when k ends) on identical `workers`.

    "fifo" runs ready tasks in the order they became ready, as Dask does without priorities;
    "priority" runs the one with the most remaining chain work first, as the cost-model
    priorities ask Dask to. Returns every task with its worker and times.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    ready: list[tuple] = []
    counter = 0

    def make_ready(chain: int, iteration: int) -> None:
        nonlocal counter
        rank = -remaining_work(chains[chain], iteration) if policy == "priority" else 0.0
        heapq.heappush(ready, (rank, counter, chain, iteration))
        counter += 1

    for chain, costs in enumerate(chains):
        if costs:
            make_ready(chain, 1)
    free = [(0.0, w) for w in range(workers)]  # (time the worker is free, worker)
    heapq.heapify(free)
    running: list[tuple[float, int, int, int]] = []  # (end, chain, iteration, worker)
    schedule: list[Scheduled] = []
    now = 0.0
    while ready or running:
        while ready and free and free[0][0] <= now:
            _, worker = heapq.heappop(free)
            _, _, chain, iteration = heapq.heappop(ready)
            end = now + chains[chain][iteration - 1]
            schedule.append(Scheduled(chain, iteration, worker, now, end))
            heapq.heappush(running, (end, chain, iteration, worker))
        if not running:
            break
        end, chain, iteration, worker = heapq.heappop(running)
        now = end
        heapq.heappush(free, (end, worker))
        if iteration < len(chains[chain]):
            make_ready(chain, iteration + 1)
    return schedule


def makespan(schedule: list[Scheduled]) -> float:
    return max((s.end for s in schedule), default=0.0)
