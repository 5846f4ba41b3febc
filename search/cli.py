"""The ``fsweep`` command line (DESIGN §4.2).

Each subcommand is a thin handler: parse, call the library function, print.
Imports happen inside handlers so ``fsweep --help`` stays fast and one broken
optional component does not take the whole command line down.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from preprocessing.errors import FsweepError


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one ``fsweep ...: error: ...`` line (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _image_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` (e.g. 590x1006) as a tuple of ints."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 590x1006, got {text!r}") from None
    return width, height


def _cmd_synth(args: argparse.Namespace) -> None:
    from preprocessing.phantom import write_phantom

    summary = write_phantom(
        args.out, patients=args.patients, seed=args.seed, difficulty=args.difficulty, size=args.size
    )
    print(
        f"wrote {summary['images']} images of {summary['patients']} patients "
        f"({summary['abnormal_fraction']:.0%} abnormal) to {Path(args.out) / 'manifest.csv'}"
    )
    print(f"contact sheet: {summary['contact_sheet']}")


def _cmd_ingest(args: argparse.Namespace) -> None:
    from preprocessing.ingest import ingest

    result = ingest(args.manifest, args.out, seed=args.seed, salt=args.salt)
    print(f"wrote {result.dataset / 'dataset.parquet'} (fingerprint {result.fingerprint[:12]}), "
          f"{result.dataset / 'rejected.csv'}, {result.dataset / 'summary.json'}")


# --- store commands (preprocessing.roi, preprocessing.store) ---------------------------

def _cmd_roi_train(args: argparse.Namespace) -> None:
    from preprocessing.roi import train_detector

    metrics = train_detector(
        args.dataset, args.out, annotated=args.annotated, epochs=args.epochs, imgsz=args.imgsz, model=args.model,
        batch=args.batch,
    )
    print(f"mAP50={metrics['map50']:.3f} (paper: 0.97); detector in {Path(args.out) / 'best.pt'}")


def _cmd_store_build(args: argparse.Namespace) -> None:
    from preprocessing.store import build_store

    build_store(
        args.dataset, args.store, roi=args.roi, size=args.size, he_modes=args.he.split(","),
        margin=args.margin, aspect=args.aspect, address=args.address,
    )


# --- model commands (fsmodels) ----------------------------------------------------------

def _cmd_train(args: argparse.Namespace) -> None:
    from fsmodels.config import load_config
    from fsmodels.train import run_trial

    cfg = load_config(args.config, args.set)
    if args.test:
        cfg.train.test = True
    result = run_trial(cfg, args.out)
    val = result["val"]
    print(f"best epoch {result['best_epoch']}: val auc={val['auc']:.3f} accuracy={val['accuracy']:.3f} "
          f"f1={val['f1']:.3f} sensitivity={val['sensitivity']:.3f} specificity={val['specificity']:.3f}")
    if "test" in result:
        test = result["test"]
        print(f"test (best epoch): auc={test['auc']:.3f} [95% CI {test['auc_ci'][0]:.3f}-{test['auc_ci'][1]:.3f}] "
              f"accuracy={test['accuracy']:.3f} [{test['accuracy_ci'][0]:.3f}-{test['accuracy_ci'][1]:.3f}]")
    print(f"wrote {Path(args.out) / 'metrics.json'}")


def _cmd_stn_train(args: argparse.Namespace) -> None:
    from fsmodels.stn import pretrain_stn_cli

    pretrain_stn_cli(args.store, variant=args.variant, epochs=args.epochs, seed=args.seed, force=args.force)


# --- search commands (search.sweep, search.report) --------------------------------------

def _cmd_sweep(args: argparse.Namespace) -> None:
    from fsmodels.config import load_config
    from search.sweep import run_sweep

    cfg = load_config(args.config, args.set)
    name = args.name or f"{Path(args.config).stem}_{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = run_sweep(cfg, address=args.address, name=name, storage=args.storage)
    print(f"experiment: {experiment}")
    print(f"tensorboard --logdir {experiment}")


def _cmd_resume(args: argparse.Namespace) -> None:
    from search.sweep import resume_sweep

    experiment = resume_sweep(args.experiment, address=args.address)
    print(f"experiment: {experiment}")


def _cmd_report(args: argparse.Namespace) -> None:
    from search.report import write_report

    path = write_report(args.experiment)
    print(f"report: {path}")


def _cmd_export(args: argparse.Namespace) -> None:
    from search.export import export_experiment

    path = export_experiment(args.experiment, args.out)
    print(f"model: {path} (run it with `fsweep predict {path} INPUT...`)")


def _cmd_predict(args: argparse.Namespace) -> None:
    from search.predict import predict

    table = predict(args.model_dir, args.inputs, out=args.out, cam_dir=args.cam, view=args.view)
    if args.out is None:
        print(table.to_csv(index=False), end="")
    else:
        abnormal = int(table["label"].sum())
        print(f"wrote {len(table)} predictions ({abnormal} abnormal) to {args.out}", file=sys.stderr)


def _cmd_demo(args: argparse.Namespace) -> None:
    from search.demo import run_demo

    run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every ``fsweep`` subcommand."""
    parser = _OneLineParser(
        prog="fsweep",
        description="Distributed hyperparameter and backbone search for X-ray classifiers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("synth", help="write the synthetic phantom data set (manifest + images)")
    p.add_argument("--out", required=True, help="output directory (manifest.csv, images/)")
    p.add_argument("--patients", type=int, default=200, help="number of patients (2 views each)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--difficulty", type=float, default=0.5,
                   help="0 (easy) .. 1 (hard): how close narrowed foramina come to normal ones")
    p.add_argument("--size", type=_image_size, default=(590, 1006), metavar="WxH",
                   help="image width x height in pixels (default 590x1006, half the paper's)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("ingest", help="validate and decode a manifest; patient-level 60/20/20 split")
    p.add_argument("manifest", help="manifest CSV or Parquet (paths relative to it)")
    p.add_argument("--out", required=True, help="DATASET directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    p.add_argument("--salt", default=None, help="salt of the patient-id hash (default: kept in DATASET/.salt)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("roi", help="the YOLO ROI detector")
    roi_sub = p.add_subparsers(dest="roi_command", metavar="ROI_COMMAND")
    roi_sub.required = True
    p = roi_sub.add_parser("train", help="train the ROI detector on boxed rows; prints mAP50")
    p.add_argument("dataset", help="DATASET directory from `fsweep ingest`")
    p.add_argument("--out", required=True, help="ROI_DIR to write (best.pt, metrics.json)")
    p.add_argument("--annotated", type=int, default=100, help="boxed train images to use (paper: 100)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("--imgsz", type=int, default=320, help="YOLO input size")
    p.add_argument("--model", default="yolo11n.yaml", help="model yaml (built from scratch) or a local .pt")
    p.add_argument("--batch", type=int, default=4, help="images per batch (one optimizer step each)")
    p.set_defaults(func=_cmd_roi_train)

    p = sub.add_parser("store", help="the preprocessing store")
    store_sub = p.add_subparsers(dest="store_command", metavar="STORE_COMMAND")
    store_sub.required = True
    p = store_sub.add_parser("build", help="ROI crop + HE + resize once per image and variant")
    p.add_argument("dataset", help="DATASET directory from `fsweep ingest`")
    p.add_argument("--store", required=True, help="STORE path (local or shared file system)")
    p.add_argument("--roi", default="none", help="ROI_DIR from `fsweep roi train`, or none")
    p.add_argument("--size", type=int, default=512, help="square output size")
    p.add_argument("--he", default="off,global,clahe", help="comma-separated HE modes to build")
    p.add_argument("--margin", type=float, default=0.05, help="crop margin, fraction of the box")
    p.add_argument("--aspect", default="pad", choices=("pad", "stretch"), help="how a crop becomes square")
    p.add_argument("--address", default=None, help="Ray address: auto or ray://HOST:PORT (default: a local Ray)")
    p.set_defaults(func=_cmd_store_build)

    p = sub.add_parser("stn", help="the spatial transformer")
    stn_sub = p.add_subparsers(dest="stn_command", metavar="STN_COMMAND")
    stn_sub.required = True
    p = stn_sub.add_parser("train", help="pretrain the STN on left-vs-right view; saved in the store")
    p.add_argument("store", help="STORE path")
    p.add_argument("--variant", default=None, help="variant key (default: every variant in the store)")
    p.add_argument("--epochs", type=int, default=10, help="pretraining epochs")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--force", action="store_true", help="retrain even when a frozen STN exists")
    p.set_defaults(func=_cmd_stn_train)

    p = sub.add_parser("train", help="one trial, no Ray")
    p.add_argument("config", help="config YAML (one value per space key)")
    p.add_argument("--out", required=True, help="trial directory (config.yaml, metrics.json, checkpoints)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--test", action="store_true", help="score the best epoch on the test split")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sweep", help="run a Ray Tune sweep")
    p.add_argument("config", help="sweep config YAML")
    p.add_argument("--address", default=None, help="Ray address: auto or ray://HOST:PORT (default: local)")
    p.add_argument("--name", default=None, help="experiment name (default: config file stem + time)")
    p.add_argument("--storage", default=None, help="experiment storage path or URI (default: ./runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("resume", help="finish an interrupted sweep")
    p.add_argument("experiment", help="experiment directory (<storage>/<name>)")
    p.add_argument("--address", default=None, help="Ray address (default: local)")
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("report", help="leaderboard, ablation tables, ROC plots")
    p.add_argument("experiment", help="experiment directory")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("export", help="export the sweep's winners: ONNX, TorchScript, weights, model card")
    p.add_argument("experiment", help="experiment directory of a finished sweep")
    p.add_argument("--out", required=True, help="MODEL_DIR to write (must not exist or be empty)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("predict", help="run an exported model on PNG/JPEG/TIFF/DICOM files (no Ray)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="directory written by `fsweep export`")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image files, folders, or a manifest CSV/Parquet")
    p.add_argument("--out", default=None, help="predictions CSV (default: print to stdout)")
    p.add_argument("--cam", default=None, metavar="DIR", help="write a Grad-CAM PNG over each ROI crop here")
    p.add_argument("--view", default=None, choices=("left", "right"),
                   help="view of images whose manifest row or DICOM header does not give one")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("demo", help="everything on the phantom, CPU-sized")
    p.add_argument("--out", default="demo_out", help="output directory")
    p.set_defaults(func=_cmd_demo)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fsweep`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except FsweepError as exc:
        print(f"fsweep {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fsweep {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
