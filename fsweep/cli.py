"""The ``fsweep`` command line (docs/design.md, section 'The command line').

Each subcommand is a thin handler: parse, call the library function, print.
Imports happen inside handlers so ``fsweep --help`` stays fast and one broken
optional component does not take the whole command line down.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cluster.errors import FsweepError


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


NUISANCES = {  # the phantom's nuisances, each on by default (preprocessing.phantom.write_phantom)
    "overlap": "overlapping normal/narrowed foramen sizes, partial stenosis and distractor blobs",
    "exposure": "per-image exposure, gamma and contrast (what HE is for)",
    "pose": "patient tilt up to 25 degrees and spine curvature (what the STN is for)",
    "view_gap": "the left/right view gap (projection, magnification, noise)",
    "paired_labels": "correlated left/right labels of a patient",
}


def _cmd_synth(args: argparse.Namespace) -> None:
    from preprocessing.phantom import write_phantom

    given = {key: getattr(args, key) for key in ("patients", "seed", "difficulty", "size", "label_noise", "family",
                                                 *NUISANCES)}
    # flags left out take write_phantom's own (calibrated) defaults: they are set in one place
    summary = write_phantom(args.out, **{key: value for key, value in given.items() if value is not None})
    print(
        f"wrote {summary['images']} images of {summary['patients']} patients "
        f"({summary['abnormal_fraction']:.0%} abnormal) to {Path(args.out) / 'manifest.csv'}"
    )
    print(f"contact sheet: {summary['contact_sheet']}")


def _cmd_ingest(args: argparse.Namespace) -> None:
    from preprocessing.ingest import ingest

    from preprocessing.ingest import SALT_FILE_ENV, salt_from_file

    salt_file = args.salt_file or os.environ.get(SALT_FILE_ENV)
    salt = args.salt or (salt_from_file(salt_file) if salt_file else None)
    views = [v for v in (args.views or "").split(",") if v.strip()] or None
    result = ingest(args.manifest, args.out, seed=args.seed, salt=salt, folds=args.folds,
                    positive=args.positive, negative=args.negative, views=views)
    print(f"wrote {result.dataset / 'dataset.parquet'} (fingerprint {result.fingerprint[:12]}), "
          f"{result.dataset / 'rejected.csv'}, {result.dataset / 'summary.json'}")


def _cmd_manifest(args: argparse.Namespace) -> None:
    from preprocessing.dicom_manifest import write_manifest

    summary = write_manifest(args.dicom_dir, args.labels, args.out)
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(summary["unplaced_by_reason"].items()))
    print(f"wrote {summary['manifest']}: {summary['placed']} of {summary['files']} files placed "
          f"({summary['patients']} patients, {', '.join(f'{n} {v}' for v, n in summary['views'].items())})")
    if summary["unplaced"]:
        print(f"{summary['unplaced']} files not placed ({reasons}): see {summary['unplaced_csv']}")


# --- config shortcuts -------------------------------------------------------------------

def _add_config(p: argparse.ArgumentParser, shortcuts: tuple = (), config_required: bool = False) -> None:
    """CONFIG (or --config), ``--set KEY=VALUE`` and flags that are shortcuts for --set, without defaults."""
    if config_required:
        p.add_argument("config", help="config YAML (defaults <- this file <- flags <- --set)")
    else:
        p.add_argument("--config", default=None, help="config YAML (defaults <- this file <- flags <- --set)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. data.size=64")
    for flag, key, kind, text in shortcuts:
        if kind is bool:
            p.add_argument(flag, dest=key, action="store_const", const=True, default=None, help=f"{text} (= --set {key}=true)")
        else:
            p.add_argument(flag, dest=key, default=None, type=kind, metavar=flag.lstrip("-").upper(),
                           help=f"{text} (= --set {key})")
    p.set_defaults(shortcut_keys=[key for _, key, _, _ in shortcuts])


def _config(args: argparse.Namespace, **positional):
    """The command's config: defaults <- --config YAML <- its flags and positionals <- --set."""
    from fsmodels.config import load_config

    shortcuts = {key: getattr(args, key) for key in args.shortcut_keys}
    return load_config(args.config, args.set, shortcuts={**shortcuts, **positional})


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


ROI_SHORTCUTS = (
    ("--annotated", "roi.annotated", int, "boxed train images to use (paper: 100)"),
    ("--epochs", "roi.epochs", int, "training epochs"),
    ("--imgsz", "roi.imgsz", int, "YOLO input size"),
    ("--model", "roi.model", str, "model yaml (built from scratch) or a local .pt"),
    ("--batch", "roi.batch", int, "images per batch (one optimizer step each)"),
)
STORE_SHORTCUTS = (
    ("--roi", "roi.detector", str, "ROI_DIR from `fsweep roi train`, or none"),
    ("--size", "data.size", int, "square output size"),
    ("--he", "space.he", _comma_list, "comma-separated HE modes to build (off, global, clahe)"),
    ("--margin", "roi.margin", float, "crop margin, fraction of the box"),
    ("--aspect", "space.aspect", _comma_list, "comma-separated ways a crop becomes square: stretch (the paper, "
     "default), pad"),
)
STN_SHORTCUTS = (
    ("--epochs", "train.stn_epochs", int, "pretraining epochs"),
    ("--seed", "space.seed", int, "random seed"),
)


# --- store commands (preprocessing.roi, preprocessing.store) ---------------------------

def _cmd_roi_train(args: argparse.Namespace) -> None:
    from preprocessing.roi import train_detector

    roi = _config(args).roi
    metrics = train_detector(args.dataset, args.out, annotated=roi.annotated, epochs=roi.epochs, imgsz=roi.imgsz,
                             model=roi.model, batch=roi.batch)
    print(f"mAP50={metrics['map50']:.3f} (paper: 0.97); detector in {Path(args.out) / 'best.pt'}")


def _cmd_store_build(args: argparse.Namespace) -> None:
    from fsmodels.params import build_fold_variants

    build_fold_variants(_config(args, **{"data.dataset": args.dataset, "data.store": args.store}), args.address)


# --- model commands (fsmodels) ----------------------------------------------------------

def _cmd_train(args: argparse.Namespace) -> None:
    from fsmodels.train import run_trial

    cfg = _config(args)
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

    cfg = _config(args)
    if isinstance(cfg.space.seed, (list, dict)):
        raise FsweepError(f"space.seed: the STN is pretrained with one seed, got {cfg.space.seed!r}")
    pretrain_stn_cli(args.store, variant=args.variant, epochs=cfg.train.stn_epochs, seed=cfg.space.seed,
                     force=args.force)


# --- search commands (search.sweep, search.report) --------------------------------------

def _cmd_sweep(args: argparse.Namespace) -> None:
    from search.sweep import run_sweep

    cfg = _config(args)
    name = args.name or f"{Path(args.config).stem}_{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = run_sweep(cfg, address=args.address, name=name, storage=args.storage, verbose=args.verbose)
    print(f"experiment: {experiment}")
    print(f"tensorboard --logdir {experiment}")


def _cmd_plan(args: argparse.Namespace) -> None:
    from search.plan import write_plan

    if args.rate is not None and not args.rate > 0:
        raise FsweepError(f"--rate {args.rate}: expected images/s > 0")
    print(write_plan(_config(args), out=args.out, rate=args.rate))
    if args.out:
        print(f"wrote {args.out}")


def _cmd_resume(args: argparse.Namespace) -> None:
    from search.sweep import resume_sweep

    experiment = resume_sweep(args.experiment, address=args.address, verbose=args.verbose)
    print(f"experiment: {experiment}")


def _cmd_status(args: argparse.Namespace) -> None:
    from cluster.storage import resolve_storage
    from search.expdir import load_sweep_config
    from search.progress import format_block, read_progress

    experiment = resolve_storage(args.experiment)
    print("\n".join(format_block(read_progress(experiment, load_sweep_config(experiment)))))


def _cmd_report(args: argparse.Namespace) -> None:
    from search.report import write_report

    path = write_report(args.experiment)
    print(f"report: {path}")


def _cmd_export(args: argparse.Namespace) -> None:
    from fsweep.export import export_experiment

    path = export_experiment(args.experiment, args.out, torchscript=args.torchscript)
    print(f"model: {path} (run it with `fsweep predict {path} INPUT...`)")


def _cmd_predict(args: argparse.Namespace) -> None:
    from fsweep.predict import predict

    table = predict(args.model_dir, args.inputs, out=args.out, cam_dir=args.cam, view=args.view)
    if args.out is None:
        print(table.to_csv(index=False), end="")
    else:
        positive = table.loc[table["label"] == 1, "prediction"]  # the class name the card gives label 1
        name = positive.iloc[0] if len(positive) else "positive"
        print(f"wrote {len(table)} predictions ({int(table['label'].sum())} {name}) to {args.out}", file=sys.stderr)


def _cmd_demo(args: argparse.Namespace) -> None:
    from fsweep.demo import DEMO_CONFIG, demo_paths, run_demo

    args.config = args.config or DEMO_CONFIG
    out = Path(args.out).resolve()
    run_demo(out, _config(args, **demo_paths(out)), verbose=args.verbose)


# --- the parser: one function per command adds its arguments; COMMANDS lists them in --help's order ---------

def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (manifest.csv, images/)")
    # checked by write_phantom against preprocessing.phantom.FAMILIES (one list; --help stays free of cv2)
    p.add_argument("--family", default=None,
                   help="phantom family: v2 (default; the label in a foramen's orientation) or height (the label in "
                        "its height along the spine, built differently)")
    p.add_argument("--patients", type=int, default=None, help="number of patients, 2 views each (default 200)")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same files; default 0)")
    p.add_argument("--difficulty", type=float, default=None,
                   help="0 (easy) .. 1 (hard): how round and wobbly foramina are (default: the calibrated 0.5)")
    p.add_argument("--size", type=_image_size, default=None, metavar="WxH",
                   help="image width x height in pixels (default 590x1006, half the paper's)")
    for nuisance, text in NUISANCES.items():
        p.add_argument(f"--no-{nuisance.replace('_', '-')}", dest=nuisance, action="store_const", const=False,
                       default=None, help=f"switch off {text}")
    p.add_argument("--label-noise", type=float, default=None, metavar="RATE",
                   help="share of views per side whose label is flipped (default 0.04)")


def _ingest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="manifest CSV or Parquet (paths relative to it)")
    p.add_argument("--out", required=True, help="DATASET directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    p.add_argument("--salt", default=None, help="salt of the patient-id hash (default: kept in DATASET/.salt)")
    p.add_argument("--salt-file", default=None, help="keep the salt in this file, outside DATASET (made if missing; "
                   "default $FSWEEP_SALT_FILE): the folder alone then cannot be brute-forced back to patient ids")
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="also write K >= 3 rotating patient-level folds (fold_0..; test and val rotate; split = fold 0)")
    p.add_argument("--positive", default=None, metavar="NAME",
                   help="the positive class's name in the label column (default abnormal; 1 always means positive)")
    p.add_argument("--negative", default=None, metavar="NAME",
                   help="the negative class's name in the label column (default normal; 0 always means negative)")
    p.add_argument("--views", default=None, metavar="A,B,..",
                   help="the data set's views; rows naming another are rejected (default: the manifest's names; "
                        "left/right only when it names left or right)")


def _manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dicom_dir", metavar="DIR", help="folder of DICOM files (searched recursively)")
    p.add_argument("--labels", required=True, metavar="CSV", help="labels table: patient_id, view, label")
    p.add_argument("--out", required=True, metavar="MANIFEST", help="manifest CSV to write (+ <stem>_unplaced.csv)")


def _roi_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="DATASET directory from `fsweep ingest`")
    p.add_argument("--out", required=True, help="ROI_DIR to write (best.pt, metrics.json)")
    _add_config(p, ROI_SHORTCUTS)


def _store_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="DATASET directory from `fsweep ingest` (= --set data.dataset)")
    p.add_argument("--store", required=True, help="STORE path or URI (= --set data.store)")
    _add_config(p, STORE_SHORTCUTS)
    p.add_argument("--address", default=None, help="Ray address: auto or ray://HOST:PORT (default: a local Ray)")


def _stn_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="STORE path")
    p.add_argument("--variant", default=None, help="variant key (default: every variant in the store)")
    _add_config(p, STN_SHORTCUTS)
    p.add_argument("--force", action="store_true", help="retrain even when a frozen STN exists")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="trial directory (config.yaml, metrics.json, checkpoints)")
    _add_config(p, (("--test", "train.test", bool, "score the best epoch on the test split"),), config_required=True)


def _verbose_arg(p: argparse.ArgumentParser, what: str = "Ray's trial tables and the trials' output too") -> None:
    p.add_argument("-v", "--verbose", action="store_true", help=what)


def _sweep_args(p: argparse.ArgumentParser) -> None:
    _add_config(p, config_required=True)
    p.add_argument("--address", default=None, help="Ray address: auto or ray://HOST:PORT (default: local)")
    p.add_argument("--name", default=None, help="experiment name (default: config file stem + time)")
    p.add_argument("--storage", default=None, help="experiment storage path or URI (default: ./runs)")
    _verbose_arg(p)


def _plan_args(p: argparse.ArgumentParser) -> None:
    _add_config(p, config_required=True)
    p.add_argument("--out", default=None, metavar="FILE.csv", help="also write the rows as CSV")
    p.add_argument("--rate", type=float, default=None, metavar="IMG_PER_S",
                   help="one trial's measured training img/s (leaderboard img_per_s, bench/gpu.py): prints device-hours")


def _resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment directory (<storage>/<name>)")
    p.add_argument("--address", default=None, help="Ray address (default: local)")
    _verbose_arg(p)


def _experiment_arg(text: str):
    """Arguments of a command that takes only an experiment directory, described by ``text``."""
    return lambda p: p.add_argument("experiment", help=text)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment directory of a finished sweep")
    p.add_argument("--out", required=True, help="MODEL_DIR to write (must not exist or be empty)")
    p.add_argument("--torchscript", action="store_true",
                   help="also write model.torchscript.pt (deprecated by PyTorch; for readers that still need it)")


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="directory written by `fsweep export`")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image files, folders, or a manifest CSV/Parquet")
    p.add_argument("--out", default=None, help="predictions CSV (default: print to stdout)")
    p.add_argument("--cam", default=None, metavar="DIR", help="write a Grad-CAM PNG over each ROI crop here")
    p.add_argument("--view", default=None,
                   help="view of images whose manifest row or DICOM header does not give one (left, right, "
                        "or a view the model was trained on)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output directory")
    _add_config(p)  # --config defaults to configs/demo.yaml
    _verbose_arg(p, "Ray's tables, the trials' and YOLO's output too")


GROUPS = {  # commands with subcommands: name -> (help, dest and metavar of the subcommand)
    "roi": ("the YOLO ROI detector", "roi_command", "ROI_COMMAND"),
    "store": ("the preprocessing store", "store_command", "STORE_COMMAND"),
    "stn": ("the spatial transformer", "stn_command", "STN_COMMAND"),
}
COMMANDS = (  # (command words, help, arguments, handler), in --help's order
    (("synth",), "write the synthetic phantom data set (manifest + images)", _synth_args, _cmd_synth),
    (("ingest",), "validate and decode a manifest; patient-level 60/20/20 split", _ingest_args, _cmd_ingest),
    (("manifest",), "a manifest from a folder of DICOM files and a labels table", _manifest_args, _cmd_manifest),
    (("roi", "train"), "train the ROI detector on boxed rows; prints mAP50", _roi_train_args, _cmd_roi_train),
    (("store", "build"), "ROI crop + HE + resize once per image and variant (one per space.he value)",
     _store_build_args, _cmd_store_build),
    (("stn", "train"), "pretrain the STN on left-vs-right view; saved in the store", _stn_train_args, _cmd_stn_train),
    (("train",), "one trial, no Ray", _train_args, _cmd_train),
    (("sweep",), "run a Ray Tune sweep", _sweep_args, _cmd_sweep),
    (("plan",), "the trials a sweep will run and their cost (no Ray, no training)", _plan_args, _cmd_plan),
    (("resume",), "finish an interrupted sweep", _resume_args, _cmd_resume),
    (("status",), "a running or finished sweep at a glance (reads its files; no Ray)",
     _experiment_arg("experiment directory (<storage>/<name>)"), _cmd_status),
    (("report",), "leaderboard, ablation tables, ROC plots", _experiment_arg("experiment directory"), _cmd_report),
    (("export",), "export the sweep's winners: ONNX, model.pt2, the detector in ONNX, weights, model card", _export_args, _cmd_export),
    (("predict",), "run an exported model on PNG/JPEG/TIFF/DICOM files (no Ray)", _predict_args, _cmd_predict),
    (("demo",), "everything on the phantom, CPU-sized", _demo_args, _cmd_demo),
)


def _subparsers(parser: argparse.ArgumentParser, dest: str, metavar: str):
    sub = parser.add_subparsers(dest=dest, metavar=metavar)
    sub.required = True
    return sub


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every ``fsweep`` subcommand (``COMMANDS``; ``GROUPS`` for ``roi train`` and the like)."""
    parser = _OneLineParser(
        prog="fsweep",
        description="Distributed hyperparameter and backbone search for X-ray classifiers.",
    )
    sub = _subparsers(parser, "command", "COMMAND")
    groups = {}
    for words, text, add_arguments, handler in COMMANDS:
        where = sub
        if len(words) == 2:
            if words[0] not in groups:
                group_help, dest, metavar = GROUPS[words[0]]
                groups[words[0]] = _subparsers(sub.add_parser(words[0], help=group_help), dest, metavar)
            where = groups[words[0]]
        p = where.add_parser(words[-1], help=text)
        add_arguments(p)
        p.set_defaults(func=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fsweep`` console script; returns the exit status."""
    from cluster.gpuenv import set_process_env

    set_process_env()  # CUBLAS_WORKSPACE_CONFIG before any command's first CUDA call (train.deterministic)
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
