"""Patient-level, stratified, deterministic 60/20/20 split (DESIGN §3).

Every image of a patient lands in one split, so a patient's mirrored anatomy can
never be trained on (through Flip) while their other view is tested.

Stratification: patients are grouped by their label pattern (left label, right
label, '-' where a view is absent, e.g. ``L1R0``). Groups are taken in a fixed
order, patients inside a group in a seeded random order, and the whole sequence
is dealt out with the repeating pattern train, val, train, test, train. So every
group, and therefore each split's abnormal fraction, follows 60/20/20 to within
one patient per group, and the overall sizes are exact to within one patient.
The order only depends on the raw patient ids and the seed, never on the salt.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from preprocessing.vocab import VIEWS

DEAL = ("train", "val", "train", "test", "train")  # 3 : 1 : 1 = 60/20/20, val before test for small groups


def label_pattern(rows: pd.DataFrame) -> str:
    """A patient's stratum: its label per view, e.g. 'L1R0' or 'L-R1' when the left view is absent."""
    by_view = dict(zip(rows["view"], rows["label"]))
    return "".join(f"{side[0].upper()}{by_view.get(side, '-')}" for side in VIEWS)


def patient_splits(rows: pd.DataFrame, seed: int) -> dict[str, str]:
    """Map each ``patient_id`` of ``rows`` (columns patient_id, view, label) to train/val/test."""
    strata: dict[str, list[str]] = {}
    for patient, group in rows.groupby("patient_id", sort=True):
        strata.setdefault(label_pattern(group), []).append(str(patient))
    rng = np.random.default_rng(seed)
    order = []
    for key in sorted(strata):
        patients = sorted(strata[key])
        order += [patients[i] for i in rng.permutation(len(patients))]
    return {patient: DEAL[i % len(DEAL)] for i, patient in enumerate(order)}
