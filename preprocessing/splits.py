"""Patient-level, stratified, deterministic 60/20/20 split (docs/design.md, 'Patient-level splits').

Every image of a patient lands in one split, so a patient's mirrored anatomy can
never be trained on (through Flip) while their other view is tested.

Stratification: patients are grouped by their label pattern (left label, right
label, '-' where a view is absent, e.g. ``L1R0``; with other views, each view the
patient has and its label, e.g. ``elbow=1,wrist=0``). Groups are taken in a fixed
order, patients inside a group in a seeded random order, and the whole sequence
is dealt out with the repeating pattern train, val, train, test, train. So every
group, and therefore each split's abnormal fraction, follows 60/20/20 to within
one patient per group, and the overall sizes are exact to within one patient.
The order only depends on the raw patient ids and the seed, never on the salt.

Repeated splits (``fsweep ingest --folds K``, K >= 3): the same stratified order is dealt
round-robin into K patient groups; in fold k group k is test, group k+1 (mod K) is val and
the rest is train. So every patient is tested in exactly one fold, no patient is in two
splits of one fold, and K = 5 gives the paper's 60/20/20 in every fold. Column ``fold_k``
of dataset.parquet holds fold k's split; ``split`` is fold 0's.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cluster.errors import FsweepError
from preprocessing.vocab import VIEWS

DEAL = ("train", "val", "train", "test", "train")  # 3 : 1 : 1 = 60/20/20, val before test for small groups


def label_pattern(rows: pd.DataFrame) -> str:
    """A patient's stratum: its label per view, e.g. 'L1R0' or 'L-R1' when the left view is absent; with
    views outside the mirrored pair, its views and their labels, e.g. 'elbow=1,wrist=0'."""
    by_view = dict(zip(rows["view"], rows["label"]))
    if not set(by_view) <= set(VIEWS):
        return ",".join(f"{view}={by_view[view]}" for view in sorted(by_view))
    return "".join(f"{side[0].upper()}{by_view.get(side, '-')}" for side in VIEWS)


def fold_column(fold: int) -> str:
    """The dataset.parquet column holding fold ``fold``'s split."""
    return f"fold_{fold}"


def dataset_folds(columns) -> int:
    """How many folds a dataset's columns carry (0: one split only)."""
    count = 0
    while fold_column(count) in columns:
        count += 1
    return count


def patient_folds(rows: pd.DataFrame, seed: int, folds: int) -> dict[str, list[str]]:
    """Map each ``patient_id`` of ``rows`` to its split in each of ``folds`` rotations (see the module doc)."""
    if folds < 3:
        raise FsweepError(f"--folds must be 3 or more (test, val and train rotate), got {folds}")
    order = _stratified_order(rows, seed)
    if len(order) < folds:
        raise FsweepError(f"--folds {folds}: only {len(order)} patients")
    group = {patient: i % folds for i, patient in enumerate(order)}
    return {
        patient: ["test" if g == k else "val" if g == (k + 1) % folds else "train" for k in range(folds)]
        for patient, g in group.items()
    }


def patient_splits(rows: pd.DataFrame, seed: int) -> dict[str, str]:
    """Map each ``patient_id`` of ``rows`` (columns patient_id, view, label) to train/val/test."""
    return {patient: DEAL[i % len(DEAL)] for i, patient in enumerate(_stratified_order(rows, seed))}


def _stratified_order(rows: pd.DataFrame, seed: int) -> list[str]:
    """Patients stratum by stratum (fixed order), shuffled within a stratum by ``seed``."""
    strata: dict[str, list[str]] = {}
    for patient, group in rows.groupby("patient_id", sort=True):
        strata.setdefault(label_pattern(group), []).append(str(patient))
    rng = np.random.default_rng(seed)
    order = []
    for key in sorted(strata):
        patients = sorted(strata[key])
        order += [patients[i] for i in rng.permutation(len(patients))]
    return order
