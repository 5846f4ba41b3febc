"""ASHA against FIFO on the phantom: the same random-search space, seed and sample count.

Both sweeps draw the same trial configurations (``search.seed``); FIFO trains every
trial for all epochs, ASHA stops the weaker ones at its rungs. Printed per
scheduler: total trial-epochs spent, wall time and the best validation AUC found.
The last line is ``asha_epoch_savings_x=<FIFO trial-epochs / ASHA trial-epochs>``
(target >= 3 with ASHA's best AUC within 0.01 of FIFO's).
Usage: ``python bench/asha.py [--out DIR --patients 80 --samples 16 --epochs 18 --size 32]``;
``--quick``: the smallest run (20 patients, 3 trials of at most 3 epochs per sweep) to check that the bench
works; its ratio means little.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fsmodels.config import Config

QUICK = dict(patients=20, samples=3, epochs=3, size=32)  # --quick: the smallest run


def bench_config(dataset: Path, store: Path, args: argparse.Namespace) -> Config:
    """Random search over lr and batch size for timm's tiny ``test_resnet`` at ``args.size`` px."""
    cfg = Config()
    cfg.data.dataset, cfg.data.store, cfg.data.size = str(dataset), str(store), args.size
    cfg.space.backbone, cfg.space.view, cfg.space.epochs = "test_resnet", "right", args.epochs
    cfg.space.lr, cfg.space.batch_size = {"loguniform": [1e-4, 0.3]}, [8, 16]
    cfg.space.he, cfg.space.flip, cfg.space.stn, cfg.space.seed = "global", True, "off", 0
    cfg.train.pretrained, cfg.train.step_size = "none", args.epochs
    cfg.search.algorithm, cfg.search.num_samples, cfg.search.seed = "random", args.samples, args.seed
    cfg.search.grace_period, cfg.search.reduction_factor, cfg.search.max_failures = 1, 3, 0
    return cfg


def run(cfg: Config, scheduler: str, storage: Path) -> dict:
    """One sweep; its trial-epochs, best validation AUC and wall time."""
    from search.select import leaderboard
    from search.sweep import run_sweep

    cfg.search.scheduler = scheduler
    started = time.time()
    experiment = run_sweep(cfg, name=scheduler, storage=str(storage))
    board = leaderboard(experiment)
    return {
        "trial_epochs": int(board["epochs_run"].sum()),
        "best_val_auc": float(board["val_auc"].max()),
        "seconds": time.time() - started,
        "trials": len(board),
    }


def main() -> None:
    """Phantom -> dataset -> FIFO sweep -> ASHA sweep; print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--patients", type=int, default=80, help="phantom patients")
    parser.add_argument("--difficulty", type=float, default=0.9, help="phantom difficulty (easier saturates AUC at 1)")
    parser.add_argument("--samples", type=int, default=16, help="trials per sweep")
    parser.add_argument("--epochs", type=int, default=18, help="epochs per trial (ASHA max_t)")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--seed", type=int, default=0, help="search seed (same configs for both sweeps)")
    parser.add_argument("--quick", action="store_true", help=f"the smallest run ({QUICK}); overrides those flags")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)

    from cluster.connect import connect
    from preprocessing.ingest import ingest
    from preprocessing.phantom import write_phantom

    out = Path(args.out or tempfile.mkdtemp(prefix="fsweep-asha-"))
    write_phantom(out / "phantom", patients=args.patients, seed=0, difficulty=args.difficulty, size=(148, 252))
    ingest(out / "phantom" / "manifest.csv", out / "dataset", seed=0, salt="bench", echo=False)
    # as `fsweep sweep` does: trial output stays in the trials' logs; streamed to this driver, Ray's log
    # monitor prints it late, after the headline line that must come last
    connect(None, log_to_driver=False)
    cfg = bench_config(out / "dataset", out / "store", args)
    results = {name: run(cfg, name, out / "runs") for name in ("fifo", "asha")}
    for name, r in results.items():
        print(f"{name}: trials={r['trials']} trial_epochs={r['trial_epochs']} best_val_auc={r['best_val_auc']:.4f} "
              f"wall_s={r['seconds']:.0f}")
    gap = results["fifo"]["best_val_auc"] - results["asha"]["best_val_auc"]
    print(f"best_val_auc_gap={gap:.4f} (FIFO - ASHA; target <= 0.01)")
    print(f"asha_epoch_savings_x={results['fifo']['trial_epochs'] / results['asha']['trial_epochs']:.2f}")


if __name__ == "__main__":
    main()
