"""Chains on workers: the simulator, the lower bound, priorities and the shard planner."""

import numpy as np
import pandas as pd
import pytest

from models import ModelSpec
from tasks.cost_model import CostModel
from tasks.schedule import lower_bound, makespan, priority_of, simulate
from tasks.series import DataError, series_architectures
from tasks.shards import NetworkLoad, chain_costs, plan_auto_shards, plan_fixed_shards

MLP = ModelSpec(hidden=8, layers=1, window=8, horizon=2, epochs_per_iteration=2, batch_size=16)
LSTM = MLP.model_copy(update={"architecture": "lstm"})
PRIOR = {
    ("mlp", "one_by_one", "cpu"): np.array([0.01, 0.002, 2e-9, 1e-4]),
    ("mlp", "fused", "cpu"): np.array([0.01, 0.003, 1e-9, 3e-4]),
    ("lstm", "one_by_one", "cpu"): np.array([0.01, 0.004, 1e-8, 5e-4]),
    ("lstm", "fused", "cpu"): np.array([0.01, 0.004, 2e-8, 5e-4]),
}


def test_priorities_start_the_long_chain_first_and_fifo_does_not():
    chains = [[1.0]] * 6 + [[3.0, 3.0, 3.0]]  # the long chain is submitted last
    fifo, ranked = simulate(chains, 2, "fifo"), simulate(chains, 2, "priority")
    assert makespan(ranked) == pytest.approx(9.0) == lower_bound(chains, 2)
    assert makespan(fifo) == pytest.approx(12.0)
    assert priority_of([3.0, 3.0, 3.0], 2) == 6000


def test_simulated_schedules_respect_chains_workers_and_the_bound():
    rng = np.random.default_rng(1)
    chains = [list(rng.uniform(0.1, 5, rng.integers(1, 5))) for _ in range(40)]
    for policy in ("fifo", "priority"):
        schedule = simulate(chains, 3, policy)
        assert len(schedule) == sum(len(c) for c in chains)
        assert makespan(schedule) >= lower_bound(chains, 3) - 1e-9
        by_chain = {}
        for task in schedule:
            by_chain.setdefault(task.chain, []).append(task)
        for tasks in by_chain.values():
            tasks.sort(key=lambda t: t.iteration)
            assert all(b.start >= a.end - 1e-9 for a, b in zip(tasks, tasks[1:]))
        for worker in range(3):
            mine = sorted((t for t in schedule if t.worker == worker), key=lambda t: t.start)
            assert all(b.start >= a.end - 1e-9 for a, b in zip(mine, mine[1:]))
    with pytest.raises(ValueError, match="policy"):
        simulate(chains, 2, "random")


def skewed_loads(count=300, seed=0):
    rng = np.random.default_rng(seed)
    windows = np.exp(rng.uniform(np.log(100), np.log(2500), count)).astype(int)
    return [NetworkLoad(f"s{i}", LSTM if i % 3 == 0 else MLP.model_copy(update={"expanding_window": False}),
                        int(w)) for i, w in enumerate(windows)]  # fmt: skip


@pytest.mark.parametrize("strategy", ["one_by_one", "fused"])
def test_auto_plan_is_complete_homogeneous_balanced_and_near_the_bound(strategy):
    loads = skewed_loads()
    model = CostModel(PRIOR)
    shards, summary = plan_auto_shards(loads, 3, 4, model, overhead=0.05, strategy=strategy, device="cpu")
    placed = [sid for s in shards for sid in s.series_ids]
    assert sorted(placed) == sorted(n.series_id for n in loads)
    by_id = {n.series_id: n for n in loads}
    assert all(len({by_id[sid].spec for sid in s.series_ids}) == 1 for s in shards)
    assert all(s.spec == by_id[s.series_ids[0]].spec for s in shards)
    assert len(shards) >= 3 * 4 and summary.overhead_share <= 0.10
    assert summary.predicted_makespan <= 1.15 * summary.lower_bound
    fixed = plan_fixed_shards([n.series_id for n in loads], 25)
    fixed_chains = [chain_costs([by_id[i] for i in s.series_ids], 3, model, 0.05, strategy, "cpu") for s in fixed]
    assert summary.predicted_makespan < makespan(simulate(fixed_chains, 4, "fifo"))


def test_a_large_overhead_means_fewer_bigger_shards():
    loads, model = skewed_loads(), CostModel(PRIOR)
    cheap, _ = plan_auto_shards(loads, 2, 4, model, overhead=0.001, strategy="one_by_one", device="cpu")
    dear, summary = plan_auto_shards(loads, 2, 4, model, overhead=2.0, strategy="one_by_one", device="cpu")
    assert len(dear) < len(cheap)


def test_architecture_column_is_read_per_series_and_checked():
    table = pd.DataFrame({"series_id": [1, 1, 2, 3], "architecture": ["LSTM", "lstm", "mlp", None]})
    assert series_architectures(table, ("mlp", "lstm")) == {"1": "lstm", "2": "mlp"}
    assert series_architectures(table.drop(columns="architecture"), ("mlp",)) == {}
    with pytest.raises(DataError, match="'gru' for series '2'"):
        series_architectures(table.replace({"mlp": "gru"}), ("mlp", "lstm"))
    with pytest.raises(DataError, match="series '1' has more than one architecture"):
        series_architectures(table.replace({"LSTM": "mlp"}), ("mlp", "lstm"))


def test_the_strategy_choice_follows_the_cost_model_per_architecture():
    from tasks.cost_model import effective_strategy
    from tasks.shards import choose_strategies

    prior = {
        # MLP: fused costs a fifth per window; LSTM: fused costs three times as much.
        ("mlp", "one_by_one", "cpu"): np.array([0.01, 0.002, 5e-9, 1e-4]),
        ("mlp", "fused", "cpu"): np.array([0.01, 0.0005, 1e-9, 1e-4]),
        ("lstm", "one_by_one", "cpu"): np.array([0.01, 0.004, 1e-8, 5e-4]),
        ("lstm", "fused", "cpu"): np.array([0.01, 0.004, 3e-8, 5e-4]),
    }
    loads = [NetworkLoad(f"m{i}", MLP, 500 + 40 * i) for i in range(30)]
    loads += [NetworkLoad(f"l{i}", LSTM, 500 + 40 * i) for i in range(30)]
    choices = choose_strategies(loads, 2, 2, CostModel(prior), 0.05, "cpu")
    assert {a: c["strategy"] for a, c in choices.items()} == {"mlp": "fused", "lstm": "one_by_one"}
    for choice in choices.values():
        predicted = choice["predicted_makespan"]
        assert set(predicted) == {"one_by_one", "fused"}
        assert choice["strategy"] == min(predicted, key=predicted.get)
    # A strategy the model knows nothing of is not chosen; an architecture it knows nothing of trains alone.
    unknown = {k: v for k, v in prior.items() if k != ("mlp", "fused", "cpu") and k[0] != "lstm"}
    choices = choose_strategies(loads, 2, 2, CostModel(unknown), 0.05, "cpu")
    assert choices["mlp"]["strategy"] == "one_by_one" and choices["lstm"]["predicted_makespan"] == {}
    assert effective_strategy(LSTM, {"mlp": "fused"}) == "one_by_one"
    assert effective_strategy(MLP, {"mlp": "fused"}) == "fused"


def test_device_auto_is_cpu_without_cuda_and_cuda_is_refused_where_there_is_none():
    import torch

    from flows.cluster import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto", None) == "cpu"
    assert resolve_device("cpu", None) == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda", None)


def _page_faults_of_reused_tensors(rounds: int = 20) -> int:
    """Page faults while allocating, touching and freeing two 4 MiB tensors `rounds` times (as training steps do)."""
    import resource

    import torch

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    for _ in range(2):  # settle the heap first
        torch.empty(2**20).fill_(1.0), torch.empty(2**20).fill_(1.0)
    before = faults()
    for _ in range(rounds):
        torch.empty(2**20).fill_(1.0), torch.empty(2**20).fill_(1.0)
    return faults() - before


def test_workers_reuse_freed_tensor_memory_instead_of_page_faulting_it_afresh():
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536: every step's tensors came back
    # as fresh pages from the kernel (~6,400 faults a fused step, benchmarks/malloc_step.py). The
    # warm-up plugin resets glibc.
    import dask
    import distributed

    from flows.cluster import TorchWarmup

    assert dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"]  # what it corrects
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:  # fmt: skip
        untuned = list(client.run(_page_faults_of_reused_tensors).values())[0]
        client.register_plugin(TorchWarmup(("mlp",)))
        tuned = list(client.run(_page_faults_of_reused_tensors).values())[0]
    assert untuned > 20 * 1024  # at least 4 MiB of fresh pages a round
    assert tuned * 4 < untuned


def test_the_warmup_plugin_warms_each_architecture_once_per_worker_process(monkeypatch):
    # The local cluster registers it at start and train_shards again: setup runs twice per worker.
    import flows.cluster

    warmed = []
    monkeypatch.setattr(flows.cluster, "_WARMED", set())
    monkeypatch.setattr(flows.cluster, "warm_up", lambda device, architectures: warmed.append((device, architectures)))
    monkeypatch.setattr(flows.cluster, "keep_freed_memory", lambda: True)
    monkeypatch.setattr(flows.cluster.torch.cuda, "is_available", lambda: False)
    flows.cluster.TorchWarmup.for_run("mlp", {"a": "lstm"}).setup(worker=None)
    flows.cluster.TorchWarmup.for_run("mlp", {"a": "lstm", "b": "gru"}).setup(worker=None)
    # A CUDA run on a worker without a GPU warms its CPU, where the architectures are warm already.
    flows.cluster.TorchWarmup.for_run("mlp", {"b": "gru", "c": "transformer"}, "cuda").setup(worker=None)
    assert warmed == [("cpu", ("lstm", "mlp")), ("cpu", ("gru",)), ("cpu", ("transformer",))]
