"""Manifest ingestion: validate, decode, hash patients, split at patient level.

The formats are docs/design.md's 'The manifest' and 'Files the commands write'.

A row is rejected (one line in ``rejected.csv`` with its 1-based data-row number
and the reason; the run goes on) when its image path is empty or the file is
missing, the image does not decode, the view or label is unknown, the patient id
is empty, the box is partial or does not fit the image, or the image duplicates
an accepted one (same file or same decoded pixels: the later row is rejected).
When one patient has both a normal and an abnormal row for the same view, every
row of that patient and view is rejected: nothing says which label is right, and
keeping either would train on a guess.

The reason names the kind first (``no pixel data: RT Plan``, ``truncated file``,
``multi-frame: 2 frames ...``, ``no decoder: compressed with ...``, ``not a DICOM file``,
``undecodable image: ...``), in plain words; ``summary.json`` counts rows per kind.
Warnings that pydicom, numpy or a decoder raise while a file decodes are not printed:
each goes to ``warnings.csv`` (row, image, warning), and ``summary.json``'s
``warnings`` counts the rows per warning (file-specific numbers and tags blanked).

Views are the data set's own names (``preprocessing.vocab.view_name``); without a ``view`` column
every row is one view, ``all``. A manifest that names the mirrored pair (left/right, L/R) is the
paper's shape, and a row there naming another view is rejected as an unknown view: a typo would
otherwise become a third view silently. ``views`` (``--views``) declares the view set outright.
Labels are binary: 1/0 always, plus the class names (``abnormal``/``normal`` unless ``positive`` /
``negative`` name the data set's own); a label column with more than two classes stops ingestion.

A file that is not a manifest at all (not found, empty, not CSV/Parquet, missing
required columns) stops ingestion with one ``FsweepError`` line.

Patient ids are stored only as ``sha256(salt + ":" + id)[:16]``. The salt is
``--salt`` or a random one kept in ``DATASET/.salt`` (mode 0600) so a re-ingest
hashes the same way. No DICOM header value is read here: only pixels. Image
paths are stored as absolute paths, as given: a file name that spells out a
patient id is the manifest author's choice.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cluster.errors import FsweepError
from preprocessing.decode import DecodeError, decode_with_warnings
from preprocessing.files import atomic_write_parquet, atomic_write_text
from preprocessing.splits import fold_column, patient_folds, patient_splits
from preprocessing.vocab import (
    ALL_VIEWS,
    LABEL_NAMES,
    SPLITS,
    VIEWS,
    ConfigError,
    class_names,
    has_mirrored_pair,
    label_parser,
    order_views,
    store_views,
    view_name,
)

REQUIRED = ("image", "patient_id", "label")  # `view` may be absent: one view, ALL_VIEWS
BOX = ("x0", "y0", "x1", "y1")
PARQUET_SUFFIXES = {".parquet", ".pq"}
MISSING_CELLS = {"na", "nan", "null", "none"}  # how R, pandas and SQL exports spell an empty box cell
COLUMNS = ["image_id", "image", "patient", "view", "label", "split", *BOX, "height", "width", "pixel_sha256", "row"]


@dataclass
class IngestResult:
    """What ``ingest`` wrote and counted."""

    dataset: Path  # the DATASET directory
    accepted: int  # images in dataset.parquet
    rejected: int  # rows in rejected.csv
    patients: int  # distinct accepted patients
    counts: dict = field(default_factory=dict)  # counts[split][view][label name] -> images
    views: tuple = VIEWS  # the data set's views, in order (preprocessing.vocab.order_views)
    classes: tuple = LABEL_NAMES  # (negative, positive) class names: label 0 and label 1
    rejected_by_reason: dict = field(default_factory=dict)  # reason kind -> rows
    fingerprint: str = ""  # sha256 over sorted image_id,label,split lines
    warnings: dict = field(default_factory=dict)  # library warning (file-specific parts blanked) -> rows

    def table(self) -> str:
        """Images per view x label x split, laid out like the paper's Table 2, then the rejections.

        With the mirrored pair, the last two rows add both views up: the per-view set that cross-view Flip
        yields; with another view set, one row per view and label.
        """
        width = max(12, *(len(v) + 1 for v in self.views))
        named = max(8, *(len(c) for c in self.classes))
        header = f"{'view':<{width}} {'label':<{named}} {'train':>6} {'val':>6} {'test':>6} {'total':>6}"
        lines = [header]
        pair = has_mirrored_pair(self.views)
        for view in (*self.views, *(("both (flip)",) if pair else ())):
            for label in reversed(self.classes):
                sides = VIEWS if view.startswith("both") else (view,)
                n = [sum(self.counts[split][side][label] for side in sides) for split in SPLITS]
                lines.append(f"{view:<{width}} {label:<{named}} {n[0]:>6} {n[1]:>6} {n[2]:>6} {sum(n):>6}")
        lines.append(f"accepted {self.accepted} images of {self.patients} patients; rejected {self.rejected} rows")
        lines += [f"  rejected {n:>4}: {kind}" for kind, n in sorted(self.rejected_by_reason.items())]
        lines += [f"  warning  {n:>4}: {text}" for text, n in sorted(self.warnings.items())]
        return "\n".join(lines)


def ingest(manifest: str | Path, out: str | Path, seed: int = 0, salt: str | None = None,
           echo: bool = True, folds: int = 0, positive: str | None = None, negative: str | None = None,
           views: list[str] | None = None) -> IngestResult:
    """Validate and decode every row of ``manifest``; write ``out``/dataset.parquet, rejected.csv, summary.json.

    ``seed`` fixes the patient-level 60/20/20 split (independent of the salt). ``echo`` prints the table.
    ``folds`` K >= 3 adds K rotating patient-level folds (columns ``fold_0..``; ``split`` = fold 0).
    ``positive`` / ``negative`` name the data set's classes (default abnormal / normal); ``views``
    declares the view set (default: the names the manifest uses; see the module doc).
    """
    if seed < 0:
        raise FsweepError(f"--seed must be 0 or more, got {seed}")
    manifest = Path(manifest)
    frame = read_manifest(manifest)
    classes = _classes(frame, manifest, positive, negative)
    allowed = _allowed_views(frame, manifest, views)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FsweepError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    accepted, rejected, heard = _check_rows(frame, manifest.resolve().parent, label_parser(classes), allowed)
    accepted, rejected = _reject_label_conflicts(accepted, rejected, classes)
    _write_rejected(out, rejected)
    _write_warnings(out, heard)
    if not accepted:
        for stale in ("dataset.parquet", "summary.json"):  # never leave an older dataset beside these reasons
            (out / stale).unlink(missing_ok=True)
        raise FsweepError(f"{manifest}: no usable rows, all {len(rejected)} rejected (see {out / 'rejected.csv'})")
    table = _dataset_table(accepted, seed, _salt(out, salt), folds)
    atomic_write_parquet(table, out / "dataset.parquet")  # a reader never sees half a dataset
    result = _summarise(out, table, rejected, heard, classes)
    _write_summary(out, result, manifest, seed, folds)
    if echo:
        print(result.table())
    return result


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet manifest as strings; FsweepError when it is not a usable manifest."""
    path = Path(path)
    if not path.is_file():
        raise FsweepError(f"{path}: manifest not found")
    frame = _read_table(path)
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise FsweepError(f"{path}: not a manifest, missing column(s) {', '.join(missing)} "
                          f"(need {', '.join(REQUIRED)})")
    if frame.empty:
        raise FsweepError(f"{path}: manifest has no data rows")
    if "view" not in frame.columns:  # one view: every row is the same kind of radiograph
        frame["view"] = ALL_VIEWS
    return frame


def _classes(frame: pd.DataFrame, path: Path, positive, negative) -> tuple[str, str]:
    """(negative, positive) class names; FsweepError for a label column of more than two classes, or of
    two classes that are not the default words when no names were given.

    A class is a label value that two or more rows share (its spellings, such as abnormal and 1, counted
    as one); a value on one row only is a typo, and that row alone is rejected as an unknown label.
    """
    try:
        classes = class_names(positive, negative)
    except ConfigError as exc:
        raise FsweepError(f"{path}: {exc}") from None
    parse = label_parser(classes)
    values = Counter(str(v).strip().lower() for v in frame["label"])
    values.pop("", None)
    shared = {v for v, n in values.items() if n >= 2}
    found = sorted({str(parse(v)) if parse(v) is not None else v for v in shared})
    if len(found) > 2:
        names = sorted(classes[int(v)] if v in ("0", "1") else v for v in found)
        raise FsweepError(f"{path}: {len(found)} label classes ({', '.join(names[:6])}"
                          f"{', ...' if len(names) > 6 else ''}); fsweep trains binary classifiers: "
                          "map yours to one positive and one negative class first")
    words = [v for v in found if v not in ("0", "1")]
    if words and len(found) == 2 and positive is None and negative is None:
        known = [classes[int(v)] for v in found if v in ("0", "1")]
        pair = words if not known else [words[0], known[0]] if known[0] == classes[0] else [known[0], words[0]]
        raise FsweepError(f"{path}: labels are {found[0] if not known else known[0]!r} and {words[-1]!r}, not "
                          f"{classes[1]}/{classes[0]}: name the classes, e.g. `fsweep ingest ... --positive "
                          f"{pair[0]} --negative {pair[1]}`")
    return classes


def _allowed_views(frame: pd.DataFrame, path: Path, declared: list[str] | None) -> set[str] | None:
    """The view names a row may use: the declared ones, the mirrored pair when the manifest names it, else
    any (None)."""
    if declared:
        try:
            return {view_name(v) for v in declared}
        except ConfigError as exc:
            raise FsweepError(f"{path}: --views: {exc}") from None
    names = set()
    for value in frame["view"]:
        try:
            names.add(view_name(value))
        except ConfigError:
            continue
    if names & set(VIEWS):
        return set(VIEWS)
    if ALL_VIEWS in names and len(names) > 1:  # 'all' also means every view: only a one-view set may use it
        return names - {ALL_VIEWS}
    return None


def _read_table(path: Path) -> pd.DataFrame:
    try:
        with path.open("rb") as handle:
            parquet_magic = handle.read(4) == b"PAR1"
    except OSError as exc:
        raise FsweepError(f"{path}: unreadable manifest ({exc.strerror or type(exc).__name__})") from None
    if parquet_magic or path.suffix.lower() in PARQUET_SUFFIXES:
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types; one line is what the user needs
            raise FsweepError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None
        return frame.map(_cell_text)
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise FsweepError(f"{path}: empty file, not a manifest") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise FsweepError(f"{path}: not a CSV or Parquet manifest ({type(exc).__name__})") from None


def _cell_text(value) -> str:
    """Parquet cells to the strings a CSV would give (None/NaN -> empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _check_rows(frame: pd.DataFrame, base: Path, parse_label=label_parser(), allowed: set[str] | None = None
                ) -> tuple[list[dict], list[dict], list[dict]]:
    """One pass over the rows: accepted records, rejections (row, image, reason, kind) and the
    library warnings heard while decoding (row, image, warning), accepted or not."""
    accepted, rejected, heard = [], [], []
    by_path, by_pixels = {}, {}
    for number, record in enumerate(frame.to_dict("records"), start=1):
        image = str(record.get("image", "")).strip()
        said: list[str] = []
        try:
            row = _check_row(record, image, base, by_path, by_pixels, said, parse_label, allowed)
        except _Rejected as reason:
            rejected.append({"row": number, "image": image, "reason": str(reason), "kind": reason.kind})
            continue
        finally:
            heard += [{"row": number, "image": image, "warning": text} for text in said]
        row["row"], row["given"] = number, image
        by_path[row["image"]] = number
        by_pixels[row["pixel_sha256"]] = number
        accepted.append(row)
    return accepted, rejected, heard


class _Rejected(Exception):
    """A row-level problem: the row goes to rejected.csv, the run goes on."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def _check_row(record: dict, image: str, base: Path, by_path: dict, by_pixels: dict, said: list[str],
               parse_label, allowed: set[str] | None) -> dict:
    if not image:
        raise _Rejected("missing image path")
    try:
        view = view_name(record["view"])
    except ConfigError as exc:
        raise _Rejected("unknown view", str(exc)) from None
    if allowed is not None and view not in allowed:
        raise _Rejected("unknown view", f"{record['view']!r} (this data set's views: {', '.join(order_views(allowed))})")
    label = parse_label(record["label"])
    if label is None:
        raise _Rejected("unknown label", f"{record['label']!r} (use {_label_words(parse_label)} or 1/0)")
    patient = str(record["patient_id"]).strip()
    if not patient:
        raise _Rejected("missing patient_id")
    path = (base / image).resolve()
    if not path.is_file():
        raise _Rejected("missing file", str(path))
    if str(path) in by_path:
        raise _Rejected("duplicate image", f"same file as row {by_path[str(path)]}")
    try:
        pixels, heard = decode_with_warnings(path)  # warnings come back as text, never to the terminal
    except DecodeError as exc:  # kind in plain words: no pixel data, truncated file, multi-frame, no decoder ...
        said += exc.warnings
        raise _Rejected(exc.kind, exc.detail) from None
    said += heard
    digest = pixel_sha256(pixels)
    if digest in by_pixels:
        raise _Rejected("duplicate image", f"same pixels as row {by_pixels[digest]}")
    height, width = pixels.shape
    return {"image": str(path), "patient_id": patient, "view": view, "label": label,
            **_box(record, width, height), "height": height, "width": width, "pixel_sha256": digest}


def _label_words(parse_label) -> str:
    """'abnormal/normal' (or the data set's positive/negative) for a rejection's reason."""
    names = getattr(parse_label, "names", LABEL_NAMES)
    return f"{names[1]}/{names[0]}"


def pixel_sha256(pixels: np.ndarray) -> str:
    """sha256 of a decoded image: its shape then its uint8 bytes (equal pixels, equal hash)."""
    digest = hashlib.sha256(f"{pixels.shape[0]}x{pixels.shape[1]}:".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def _box(record: dict, width: int, height: int) -> dict:
    """The optional ROI box as floats (NaN when absent); a partial or out-of-image box is rejected."""
    cells = [str(record.get(k, "")).strip() for k in BOX]
    cells = ["" if c.lower() in MISSING_CELLS else c for c in cells]
    if not any(cells):
        return {k: float("nan") for k in BOX}
    if not all(cells):
        raise _Rejected("bad box", f"partial box {','.join(cells)} (give all of x0,y0,x1,y1 or none)")
    try:
        x0, y0, x1, y1 = (float(c) for c in cells)
    except ValueError:
        raise _Rejected("bad box", f"non-numeric box {','.join(cells)}") from None
    if not (x0 < x1 and y0 < y1):
        raise _Rejected("bad box", f"empty box {x0:g},{y0:g},{x1:g},{y1:g} (needs x0 < x1 and y0 < y1)")
    if not (0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height):
        raise _Rejected("bad box", f"{x0:g},{y0:g},{x1:g},{y1:g} is outside the {width}x{height} image")
    return dict(zip(BOX, (x0, y0, x1, y1)))


def _reject_label_conflicts(accepted: list[dict], rejected: list[dict], classes: tuple[str, str] = LABEL_NAMES
                            ) -> tuple[list[dict], list[dict]]:
    """Reject every row of a (patient, view) that has both labels (see module doc for why all)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in accepted:
        groups.setdefault((row["patient_id"], row["view"]), []).append(row)
    kept = []
    for row in accepted:
        group = groups[row["patient_id"], row["view"]]
        if len({r["label"] for r in group}) > 1:
            reason = f"conflicting labels: the patient's {row['view']} view is both {classes[0]} and {classes[1]} " \
                     f"(rows {', '.join(str(r['row']) for r in group)})"
            rejected.append({"row": row["row"], "image": row["given"], "reason": reason, "kind": "conflicting labels"})
        else:
            kept.append(row)
    rejected.sort(key=lambda r: r["row"])
    return kept, rejected


SALT_FILE_ENV = "FSWEEP_SALT_FILE"  # a salt file outside DATASET (`fsweep ingest --salt-file`)


def _salt(out: Path, salt: str | None) -> str:
    """The given salt, else the one kept in DATASET/.salt, else a new random one saved there (0600)."""
    return salt or salt_from_file(out / ".salt")


def salt_from_file(keep: str | Path) -> str:
    """The salt kept in ``keep``, or a new random one written there (0600). Keeping it outside DATASET means
    the folder alone (hashes beside their salt) does not let anyone brute-force the ids by hashing guesses."""
    keep = Path(keep).expanduser()
    if keep.is_file():
        kept = keep.read_text().strip()
        if not kept:  # hashing with an empty salt would make the ids easy to recover by guessing
            raise FsweepError(f"{keep}: empty salt file (delete it for a new random salt, or pass --salt)")
        return kept
    if not keep.parent.is_dir():
        raise FsweepError(f"{keep}: its folder does not exist (the salt file is made there when missing)")
    salt = secrets.token_hex(16)
    descriptor = os.open(keep, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(salt + "\n")
    return salt


def hash_patient(patient_id: str, salt: str) -> str:
    """The only form in which a patient id is stored: 16 hex of sha256(salt:id)."""
    return hashlib.sha256(f"{salt}:{patient_id}".encode()).hexdigest()[:16]


def _dataset_table(accepted: list[dict], seed: int, salt: str, folds: int = 0) -> pd.DataFrame:
    table = pd.DataFrame(accepted)
    fold_columns = []
    if folds:
        rotations = patient_folds(table[["patient_id", "view", "label"]], seed, folds)
        fold_columns = [fold_column(k) for k in range(folds)]
        for k, column in enumerate(fold_columns):
            table[column] = table["patient_id"].map(lambda p, k=k: rotations[p][k])
        table["split"] = table[fold_column(0)]
    else:
        table["split"] = table["patient_id"].map(patient_splits(table[["patient_id", "view", "label"]], seed))
    table["patient"] = [hash_patient(p, salt) for p in table["patient_id"]]
    table["image_id"] = table["pixel_sha256"].str[:16]
    table = table[COLUMNS + fold_columns]  # drops the raw patient_id and the manifest's own spelling of the path
    return table.astype({"label": "int64", "height": "int64", "width": "int64", "row": "int64",
                         **{k: "float64" for k in BOX}}).reset_index(drop=True)


def _write_rejected(out: Path, rejected: list[dict]) -> None:
    frame = pd.DataFrame(rejected, columns=["row", "image", "reason"])
    atomic_write_text(out / "rejected.csv", frame.to_csv(index=False))


def _write_warnings(out: Path, heard: list[dict]) -> None:
    frame = pd.DataFrame(heard, columns=["row", "image", "warning"])
    atomic_write_text(out / "warnings.csv", frame.to_csv(index=False))


def warning_kind(text: str) -> str:
    """A warning with its file-specific parts (tags, quoted values, links, numbers) blanked, for counting."""
    text = re.sub(r"\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)", "(gggg,eeee)", text)
    text = re.sub(r"<[^>]*>", "<...>", text)
    text = re.sub(r"'[^']*'", "'...'", text)
    return re.sub(r"\b\d+\b", "N", text)[:160]


def _count_warnings(heard: list[dict]) -> dict[str, int]:
    """Rows per warning kind (a row that says the same thing twice counts once)."""
    kinds = {(note["row"], warning_kind(note["warning"])) for note in heard}
    return dict(sorted(Counter(kind for _, kind in kinds).items()))


def _summarise(out: Path, table: pd.DataFrame, rejected: list[dict], heard: list[dict],
               classes: tuple[str, str] = LABEL_NAMES) -> IngestResult:
    views = store_views(table["view"])
    counts = {split: {view: {name: 0 for name in reversed(classes)} for view in views} for split in SPLITS}
    for (split, view, label), n in table.groupby(["split", "view", "label"]).size().items():
        counts[split][view][classes[label]] = int(n)
    by_reason = dict(Counter(row["kind"] for row in rejected))
    return IngestResult(dataset=out, accepted=len(table), rejected=len(rejected),
                        patients=table["patient"].nunique(), counts=counts,
                        rejected_by_reason=by_reason, fingerprint=fingerprint(table),
                        warnings=_count_warnings(heard), views=views, classes=tuple(classes))



def fingerprint(table: pd.DataFrame) -> str:
    """sha256 over the sorted ``image_id,label,split`` lines: names the exact data and split."""
    lines = sorted(f"{i},{l},{s}" for i, l, s in zip(table["image_id"], table["label"], table["split"]))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _write_summary(out: Path, result: IngestResult, manifest: Path, seed: int, folds: int = 0) -> None:
    summary = {
        "manifest": str(manifest.resolve()),
        "seed": seed,
        "folds": folds,
        "accepted": result.accepted,
        "rejected": result.rejected,
        "patients": result.patients,
        "counts": result.counts,
        "views": list(result.views),
        "classes": {"negative": result.classes[0], "positive": result.classes[1]},
        "rejected_by_reason": result.rejected_by_reason,
        "warnings": result.warnings,
        "fingerprint": result.fingerprint,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def dataset_views(dataset_dir: str | Path) -> tuple[str, ...]:
    """The views of an ingested DATASET (``store_views`` of its rows: left, right for the paper's shape)."""
    import pyarrow.parquet as pq

    path = Path(dataset_dir) / "dataset.parquet"
    if not path.is_file():
        raise FsweepError(f"{dataset_dir}: no dataset.parquet (run `fsweep ingest MANIFEST --out {dataset_dir}`)")
    return store_views(pq.read_table(path, columns=["view"])["view"].to_pylist())


def dataset_classes(dataset_dir: str | Path) -> tuple[str, str]:
    """(negative, positive) class names of an ingested DATASET (normal / abnormal unless it named its own)."""
    summary = Path(dataset_dir) / "summary.json"
    named = json.loads(summary.read_text()).get("classes") if summary.is_file() else None
    return (named["negative"], named["positive"]) if named else LABEL_NAMES


def load_dataset(dataset_dir: str | Path) -> pd.DataFrame:
    """Read ``DATASET/dataset.parquet``; FsweepError when it is missing or lacks the contract columns."""
    path = Path(dataset_dir) / "dataset.parquet"
    if not path.is_file():
        raise FsweepError(f"{dataset_dir}: no dataset.parquet (run `fsweep ingest MANIFEST --out {dataset_dir}`)")
    table = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise FsweepError(f"{path}: missing column(s) {', '.join(missing)}; re-run `fsweep ingest`")
    return table
