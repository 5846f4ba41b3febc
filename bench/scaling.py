"""Throughput of one small Ray Tune sweep on 1, 2 and 3 simulated nodes.

Each node is a real Ray node (``ray.cluster_utils.Cluster``: its own raylet and
workers) with one CPU and one unit of a custom ``sim_gpu`` resource; every trial asks
for one unit, so a node runs one trial at a time, as a one-GPU node would. A trial's
work is a fixed sleep standing in for GPU time, so the machine's two real cores are
not what is measured: what is left over is Ray's own cost (scheduling, actor start,
result and checkpoint handling). The sweep runs through ``cluster.connect.connect``,
as ``fsweep sweep --address`` does.

Trial actors are reused between trials (``TuneConfig(reuse_actors=True)``): a fresh
Python worker per trial costs a process start and imports, CPU work on the two cores
rather than scheduling (``--fresh-actors`` measures that case too).

Printed per node count: wall time of ``Tuner.fit``, the ideal wall time (the sleeps
alone, perfectly packed), trials per minute, Ray's overhead per trial: the node time
each trial held beyond its sleep, ``(nodes * wall - trials * sleep) / trials``, and that
overhead split in two: ``startup_s``, from ``fit`` to the first trial running on every
node (Tune's setup, the placement group, the trial actor's process start, its imports
and the runtime_env that ships fsweep), paid once per node; and ``steady_%``, what each
later trial costs beyond its sleep, as a share of the trial's time. Last line:
``scaling_3_nodes_x=<3-node trials/min over 1-node trials/min>`` (ideal 3).
``--quick``: the smallest run (4 trials of 2 short reports on 1 and 2 nodes, last line
``scaling_2_nodes_x``) to check that the bench works; its ratio is dominated by start-up.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import ray
from ray import tune
from ray.cluster_utils import Cluster
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from cluster.connect import connect
from cluster.ray_internals import set_tune_console

set_tune_console(verbose=False, keep_set=True)  # with verbose=0: no progress tables between our rows
# as `fsweep sweep` does (search.sweep): Tune's default loggers off, its CSV and JSON loggers passed explicitly
# (the default TensorBoardX logger imports torch on the driver at the first fit, a second only the 1-node run pays)
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

TRIALS = 12  # trials per sweep
REPORTS = 4  # tune.report calls per trial (one per simulated epoch)
EPOCH_S = 0.5  # sleep per simulated epoch: a trial "computes" REPORTS * EPOCH_S seconds
NODE_COUNTS = (1, 2, 3)  # simulated worker nodes per run
QUICK = dict(trials=4, reports=2, epoch_s=0.2, node_counts=(1, 2))  # --quick: the smallest run
SLOT = "sim_gpu"  # custom resource standing in for one GPU per node


def sleeping_trial(config: dict) -> None:
    """A trial whose work is a fixed sleep (``config``: reports, epoch_s); reports once per simulated epoch."""
    started, process_cpu = time.time(), time.process_time()
    node = ray.get_runtime_context().get_node_id()
    for epoch in range(1, config["reports"] + 1):
        time.sleep(config["epoch_s"])
        tune.report({"epoch": epoch, "node": node, "started": started, "process_cpu": process_cpu})


def start_cluster(nodes: int) -> Cluster:
    """A head without the slot resource (driver only) and ``nodes`` one-slot workers."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(nodes):
        cluster.add_node(num_cpus=1, resources={SLOT: 1})
    cluster.wait_for_nodes()
    return cluster


def sweep_wall_time(storage: str, nodes: int, reuse_actors: bool, trials: int, reports: int,
                    epoch_s: float) -> tuple[float, int, float, float]:
    """Run the sweep; (wall seconds of fit, distinct nodes used, startup seconds, start-up CPU seconds per node)."""
    tuner = tune.Tuner(
        tune.with_resources(sleeping_trial, {"cpu": 1, SLOT: 1}),
        param_space={"trial": tune.grid_search(list(range(trials))), "reports": reports, "epoch_s": epoch_s},
        tune_config=tune.TuneConfig(reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=f"nodes_{nodes}", storage_path=storage, verbose=0,
                                  callbacks=[CSVLoggerCallback(), JsonLoggerCallback()]),
    )
    start, clock = time.perf_counter(), time.time()
    results = tuner.fit()
    wall = time.perf_counter() - start
    if results.errors or len(results) != trials:
        raise RuntimeError(f"{nodes} nodes: {len(results.errors)} of {len(results)} trials failed")
    first = {}  # node -> (when its first trial began running, its process's CPU seconds by then)
    for r in results:
        first[r.metrics["node"]] = min(first.get(r.metrics["node"], (math.inf, 0.0)),
                                       (r.metrics["started"] - clock, r.metrics["process_cpu"]))
    return wall, len(first), max(t for t, _ in first.values()), sum(c for _, c in first.values()) / len(first)


def measure(nodes: int, storage: str, reuse_actors: bool = True, trials: int = TRIALS, reports: int = REPORTS,
            epoch_s: float = EPOCH_S) -> dict:
    """One sweep on a fresh ``nodes``-worker cluster; the figures of one table row."""
    cluster = start_cluster(nodes)
    try:
        connect(cluster.address)
        wall, used, startup, start_cpu = sweep_wall_time(storage, nodes, reuse_actors, trials, reports, epoch_s)
    finally:
        ray.shutdown()
        cluster.shutdown()
    trial_s = reports * epoch_s
    return {
        "nodes": nodes,
        "used": used,
        "wall": wall,
        "ideal": math.ceil(trials / nodes) * trial_s,
        "per_min": trials / wall * 60.0,
        "overhead": (nodes * wall - trials * trial_s) / trials,
        "startup": startup,
        "start_cpu": start_cpu,
        # after every node is up: node time beyond the sleeps, per trial, as a share of a trial's time
        "steady": (nodes * (wall - startup) - trials * trial_s) / trials / trial_s * 100,
    }


def cpu_queue_line(row: dict) -> str:
    """What sharing this machine's cores costs the last node's start-up: its CPU work spread over the cores."""
    cores = os.cpu_count() or 1
    queued = row["nodes"] * row["start_cpu"] / cores
    return (f"{row['nodes']} nodes x {row['start_cpu']:.2f} s start-up CPU on {cores} cores: "
            f"the last node's first trial waits >= {max(queued, row['start_cpu']):.2f} s for CPU alone")


def main() -> None:
    """Measure every node count and print the table, the ratios and the headline last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh-actors", action="store_true", help="start a new trial actor per trial")
    parser.add_argument("--quick", action="store_true", help=f"the smallest run ({QUICK})")
    args = parser.parse_args()
    reuse = not args.fresh_actors
    full = dict(trials=TRIALS, reports=REPORTS, epoch_s=EPOCH_S, node_counts=NODE_COUNTS)
    sizes = dict(QUICK) if args.quick else full
    node_counts = sizes.pop("node_counts")
    print(
        f"{sizes['trials']} trials x {sizes['reports']} reports x {sizes['epoch_s']}s sleep; one trial per node at a "
        f"time; {'reused' if reuse else 'fresh'} trial actors"
    )
    print(f"{'nodes':>5} {'used':>4} {'wall_s':>7} {'ideal_s':>7} {'trials/min':>10} {'overhead/trial_s':>16} "
          f"{'startup_s':>9} {'steady_%':>8} {'start_cpu_s':>11}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fsweep-scaling-") as storage:
        for nodes in node_counts:
            row = measure(nodes, storage, reuse, **sizes)
            rows.append(row)
            print(
                f"{row['nodes']:>5} {row['used']:>4} {row['wall']:>7.1f} {row['ideal']:>7.1f} "
                f"{row['per_min']:>10.1f} {row['overhead']:>16.2f} {row['startup']:>9.2f} {row['steady']:>8.1f} "
                f"{row['start_cpu']:>11.2f}",
                flush=True,
            )
    print(cpu_queue_line(rows[-1]))
    base = rows[0]["per_min"]
    for row in rows[1:-1]:
        print(f"scaling_{row['nodes']}_nodes_x={row['per_min'] / base:.2f}")
    print(f"scaling_{rows[-1]['nodes']}_nodes_x={rows[-1]['per_min'] / base:.2f}")


if __name__ == "__main__":
    main()
