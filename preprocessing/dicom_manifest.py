"""Bring your own folder: a manifest from a folder of DICOM files and a table of labels.

The manifest's format is docs/design.md's 'The manifest'.

``write_manifest(DIR, LABELS, OUT)`` reads the header of every file under DIR (recursively,
any name: hospital exports often have no suffix) and writes OUT with the columns
image, patient_id, view, label. Paths are relative to OUT's folder, as ingest reads them.

- patient_id: the PatientID tag, trimmed.
- view (the documented rule, first that answers):
  1. ImageLaterality (0020,0062), then Laterality (0020,0060): ``L`` -> left, ``R`` -> right;
  2. the words of ViewPosition (0018,5101), then SeriesDescription (0008,103E), then
     ProtocolName (0018,1030): LEFT, LT, LAO, LPO, LLO, LL -> left; RIGHT, RT, RAO, RPO, RLO,
     RL -> right (the side the projection names). Words are split at anything that is not
     a letter, case is ignored. Single letters are not read from these texts ("L SPINE" is
     lumbar), and a text that names both sides gives no view.
- label: from LABELS (CSV with columns patient_id, view, label; view as left/right/L/R,
  label as abnormal/normal/1/0), joined on patient_id and view.

A labels table without a ``view`` column (columns patient_id, label, or study_id, label) labels
whole patients or studies, and the view is the data set's own name read from the header, first
that answers (``header_view``):

  1. ViewPosition (0018,5101), e.g. PA, AP, LL, as written (ingest lower-cases it);
  2. ImageLaterality (0020,0062), then Laterality (0020,0060): L -> left, R -> right;
  3. BodyPartExamined (0018,0015), e.g. ELBOW, WRIST.

A file none of these answer for is unplaced ("no ViewPosition, laterality or BodyPartExamined").
With study_id, every image of the study takes the study's label; the study is matched by
StudyInstanceUID (0020,000D), else AccessionNumber (0008,0050). The label is written as the table
gives it (ingest checks it, with ``--positive``/``--negative`` for class names of your own).

A file that cannot be placed goes to ``<OUT stem>_unplaced.csv`` beside OUT (columns file,
reason; file relative to OUT's folder) and is counted by reason: not a DICOM file, no pixel
data, no PatientID, no laterality or view words, patient not in the labels table, no label
for the patient's view. Nothing is printed; library warnings are only counted.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pandas as pd

from cluster.errors import FsweepError
from preprocessing.decode import (
    describe_object,
    header_has_pixels,
    header_laterality,
    read_dicom_header,
)
from preprocessing.files import atomic_write_text
from preprocessing.vocab import LABEL_NAMES, VIEWS, parse_label, parse_view

LABEL_COLUMNS = ("patient_id", "view", "label")
STUDY_TAGS = ("StudyInstanceUID", "AccessionNumber")  # how a study_id of a labels table is found in a header
VIEW_TEXT_TAGS = ("ViewPosition", "SeriesDescription", "ProtocolName")
SIDE_WORDS = {
    "left": {"LEFT", "LT", "LAO", "LPO", "LLO", "LL"},
    "right": {"RIGHT", "RT", "RAO", "RPO", "RLO", "RL"},
}


def write_manifest(dicom_dir: str | Path, labels_csv: str | Path, out: str | Path) -> dict:
    """Write the manifest ``out`` and ``<out stem>_unplaced.csv`` from the DICOM files under ``dicom_dir``.

    Returns the summary: manifest, unplaced_csv (paths), files (regular files looked at),
    placed, unplaced, unplaced_by_reason {reason: files}, patients (distinct placed),
    views {left: n, right: n}, warnings (library warnings heard while reading headers).
    Bad input (missing folder, unreadable labels table, missing columns, a bad or
    contradicting labels row) raises one-line FsweepError.
    """
    folder, out = Path(dicom_dir), Path(out)
    if not folder.is_dir():
        raise FsweepError(f"{folder}: folder not found")
    if out.is_dir():
        raise FsweepError(f"{out}: is a folder; give the manifest file to write (e.g. {out / 'manifest.csv'})")
    plain = read_plain_labels(labels_csv)  # (key column, {id: label}) when the table has no view column
    labels = read_labels(labels_csv) if plain is None else {}
    patients = {patient for patient, _ in labels}
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.resolve().parent
    unplaced_csv = out.with_name(f"{out.stem}_unplaced.csv")
    ours = {out.resolve(), unplaced_csv.resolve()}  # a manifest written inside the folder is not an input
    placed, unplaced, warnings = [], [], 0
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.resolve() not in ours)
    for path in files:
        name = os.path.relpath(path.resolve(), base)  # relative to the manifest (docs/design.md, 'The manifest')
        row, heard = _place(path, labels, patients) if plain is None else _place_by_header(path, *plain)
        warnings += len(heard)
        if isinstance(row, str):
            unplaced.append({"file": name, "reason": row})
        else:
            placed.append({"image": name, **row})
    atomic_write_text(out, pd.DataFrame(placed, columns=["image", *LABEL_COLUMNS]).to_csv(index=False))
    atomic_write_text(unplaced_csv, pd.DataFrame(unplaced, columns=["file", "reason"]).to_csv(index=False))
    return _summary(out, unplaced_csv, len(files), placed, unplaced, warnings, by_header=plain is not None)


def read_plain_labels(path: str | Path) -> tuple[str, dict[str, str]] | None:
    """A labels table without a view column as (``patient_id`` or ``study_id``, {id: label as given});
    None when it has a view column (``read_labels`` reads it). FsweepError naming the file or row."""
    table = _labels_table(path)
    if "view" in table.columns or "label" not in table.columns:
        return None
    key = "study_id" if "study_id" in table.columns else "patient_id" if "patient_id" in table.columns else None
    if key is None:
        return None
    labels: dict[str, str] = {}
    for number, record in enumerate(table.to_dict("records"), start=1):
        ident, label = str(record[key]).strip(), str(record["label"]).strip()
        if not ident or not label:
            raise FsweepError(f"{path}: row {number}: empty {key if not ident else 'label'}")
        if labels.setdefault(ident, label) != label:
            raise FsweepError(f"{path}: row {number}: {key} {ident!r} is labelled both {labels[ident]} and {label}")
    return key, labels


def _labels_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FsweepError(f"{path}: labels table not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise FsweepError(f"{path}: empty file, not a labels table") from None
    except (UnicodeDecodeError, pd.errors.ParserError):
        raise FsweepError(f"{path}: not a CSV labels table") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    return table


def header_view(header) -> str | None:
    """The data set's view name from a header: ViewPosition, else ImageLaterality/Laterality (left/right),
    else BodyPartExamined (the module doc's rule); None when none answers."""
    position = str(header.get("ViewPosition", "") or "").strip()
    if position:
        return position
    side = header_laterality(header)
    if side:
        return side
    part = str(header.get("BodyPartExamined", "") or "").strip()
    return part or None


def _patient_header(path: Path) -> tuple[object | None, str, list[str]]:
    """(header, PatientID, warnings) of a DICOM file with pixels and a patient, else (None, reason, warnings)."""
    header, heard = read_dicom_header(path)
    if header is None:
        return None, "not a DICOM file", heard
    if not header_has_pixels(header):
        what = describe_object(header)
        return None, (f"no pixel data: {what}" if what else "no pixel data"), heard
    patient = str(header.get("PatientID", "") or "").strip()
    if not patient:
        return None, "no PatientID", heard
    return header, patient, heard


def _place_by_header(path: Path, key: str, labels: dict[str, str]) -> tuple[dict | str, list[str]]:
    """(manifest row without image, warnings) with the view from the header and a patient or study label."""
    header, patient, heard = _patient_header(path)
    if header is None:
        return patient, heard  # why the file cannot be placed
    view = header_view(header)
    if view is None:
        return "no ViewPosition, laterality or BodyPartExamined", heard
    if key == "patient_id":
        if patient not in labels:
            return "patient not in labels table", heard
        return {"patient_id": patient, "view": view, "label": labels[patient]}, heard
    studies = [str(header.get(tag, "") or "").strip() for tag in STUDY_TAGS]
    study = next((s for s in studies if s in labels), None)
    if study is None:
        return "study not in labels table", heard
    return {"patient_id": patient, "view": view, "label": labels[study]}, heard


def read_labels(path: str | Path) -> dict[tuple[str, str], str]:
    """The labels table as {(patient_id, view): label name}; FsweepError naming the file or row."""
    path = Path(path)
    table = _labels_table(path)
    missing = [c for c in LABEL_COLUMNS if c not in table.columns]
    if missing:
        raise FsweepError(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(LABEL_COLUMNS)}; "
                          "or patient_id or study_id, label to read views from the headers)")
    labels: dict[tuple[str, str], str] = {}
    for number, record in enumerate(table.to_dict("records"), start=1):
        key, label = _label_row(path, number, record)
        if labels.setdefault(key, label) != label:
            raise FsweepError(f"{path}: row {number}: patient {key[0]!r} {key[1]} view is labelled both "
                              f"{labels[key]} and {label}")
    return labels


def _label_row(path: Path, number: int, record: dict) -> tuple[tuple[str, str], str]:
    """((patient_id, view), label name) of one labels row; FsweepError naming the row."""
    patient = str(record["patient_id"]).strip()
    if not patient:
        raise FsweepError(f"{path}: row {number}: empty patient_id")
    view = parse_view(record["view"])
    if view is None:
        raise FsweepError(f"{path}: row {number}: unknown view {record['view']!r} (use left/right or L/R)")
    label = parse_label(record["label"])
    if label is None:
        raise FsweepError(f"{path}: row {number}: unknown label {record['label']!r} (use abnormal/normal or 1/0)")
    return (patient, view), LABEL_NAMES[label]


def _place(path: Path, labels: dict, patients: set) -> tuple[dict | str, list[str]]:
    """(manifest row without image, warnings) for a placeable file, else (reason, warnings)."""
    header, patient, heard = _patient_header(path)
    if header is None:
        return patient, heard  # why the file cannot be placed
    view = header_laterality(header) or view_from_words(header)
    if view is None:
        return "no laterality or view words", heard
    if patient not in patients:
        return "patient not in labels table", heard
    if (patient, view) not in labels:
        return f"no label for the patient's {view} view", heard
    return {"patient_id": patient, "view": view, "label": labels[patient, view]}, heard


def view_from_words(header) -> str | None:
    """'left' / 'right' from the first of ViewPosition, SeriesDescription, ProtocolName naming one side."""
    for keyword in VIEW_TEXT_TAGS:
        words = set(re.split(r"[^A-Z]+", str(header.get(keyword, "") or "").upper()))
        sides = [side for side, names in SIDE_WORDS.items() if words & names]
        if len(sides) == 1:
            return sides[0]
    return None


def _summary(out: Path, unplaced_csv: Path, files: int, placed: list, unplaced: list, warnings: int,
             by_header: bool = False) -> dict:
    # "no pixel data: RT Plan" counts as "no pixel data"
    by_reason = Counter(row["reason"].split(":")[0] for row in unplaced)
    return {
        "manifest": str(out), "unplaced_csv": str(unplaced_csv), "files": files,
        "placed": len(placed), "unplaced": len(unplaced), "unplaced_by_reason": dict(sorted(by_reason.items())),
        "patients": len({row["patient_id"] for row in placed}),
        "views": (dict(sorted(Counter(row["view"] for row in placed).items())) if by_header
                  else {side: sum(row["view"] == side for row in placed) for side in VIEWS}),
        "warnings": warnings,
    }
