"""Decoding, manifest validation, rejections, patient-level splits, and what ingestion writes."""
from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from preprocessing.decode import decode_image, dicom_laterality, to_uint8
from cluster.errors import FsweepError
from preprocessing.ingest import COLUMNS, fingerprint, ingest, load_dataset, read_manifest
from preprocessing.phantom import write_phantom

import conftest

HEADER = ["image", "patient_id", "view", "label", "x0", "y0", "x1", "y1"]
SECRETS = ("Doe^Jane", "SECRET-4711", "St Elsewhere")  # DICOM header values that must never leave ingestion
SECRET_TAGS = ("PatientName", "PatientID", "InstitutionName")  # where write_dicom puts them


def write_dicom(path: Path, stored: np.ndarray, *args, **kwargs) -> Path:
    """conftest's DICOM writer, with this file's identifying header values in every file."""
    return conftest.write_dicom(path, stored, *args, headers=dict(zip(SECRET_TAGS, SECRETS)), **kwargs)


def _gradient(low: int, high: int, shape=(40, 30)) -> np.ndarray:
    return np.linspace(low, high, shape[0] * shape[1]).round().astype(np.int64).reshape(shape)


def _reference_uint8(values: np.ndarray) -> np.ndarray:
    """The documented mapping, written out independently: linear min..max onto 0..255."""
    values = values.astype(float)
    return np.round((values - values.min()) * 255 / (values.max() - values.min())).astype(np.uint8)


# --- decoding -----------------------------------------------------------------------------

def test_png_8bit_decodes_unchanged(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 20), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), pixels)
    assert np.array_equal(decode_image(tmp_path / "a.png"), pixels)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_png_and_tiff_map_min_max_linearly(tmp_path, suffix):
    pixels = np.random.default_rng(1).integers(1000, 60000, (30, 20)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / f"a{suffix}"), pixels)
    decoded = decode_image(tmp_path / f"a{suffix}")
    assert decoded.dtype == np.uint8 and decoded.shape == (30, 20)
    assert np.array_equal(decoded, _reference_uint8(pixels))


def test_tiff_8bit_and_jpeg_decode(tmp_path):
    pixels = cv2.GaussianBlur(np.random.default_rng(2).integers(0, 256, (40, 40), dtype=np.uint8), (0, 0), 2)
    cv2.imwrite(str(tmp_path / "a.tiff"), pixels)
    cv2.imwrite(str(tmp_path / "a.jpg"), pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert np.array_equal(decode_image(tmp_path / "a.tiff"), pixels)
    jpeg = decode_image(tmp_path / "a.jpg")
    assert jpeg.shape == pixels.shape and np.abs(jpeg.astype(int) - pixels).mean() < 3


def test_colour_image_becomes_grey(tmp_path):
    colour = np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), colour)
    assert np.array_equal(decode_image(tmp_path / "c.png"), cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))


def test_dicom_monochrome2_12bit(tmp_path):
    stored = _gradient(100, 4000)
    decoded = decode_image(write_dicom(tmp_path / "a.dcm", stored))
    assert decoded.dtype == np.uint8
    assert np.array_equal(decoded, _reference_uint8(stored))


def test_dicom_is_recognised_by_its_magic_bytes_without_a_suffix(tmp_path):
    stored = _gradient(0, 4095)
    assert np.array_equal(decode_image(write_dicom(tmp_path / "IM0001", stored)), _reference_uint8(stored))


def test_dicom_monochrome1_is_inverted_so_bone_is_bright(tmp_path):
    stored = _gradient(0, 4095)
    mono1 = decode_image(write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1"))
    mono2 = decode_image(write_dicom(tmp_path / "m2.dcm", stored, "MONOCHROME2"))
    assert np.array_equal(mono1, 255 - mono2)
    assert mono1[0, 0] == 255 and mono1[-1, -1] == 0


def test_dicom_8bit_is_kept(tmp_path):
    stored = _gradient(10, 200)
    assert np.array_equal(decode_image(write_dicom(tmp_path / "a.dcm", stored, bits_stored=8)), stored)


def test_dicom_window_applies_to_rescaled_values(tmp_path):
    # stored v -> rescaled 2v - 100; the window 1000 +- 500 is in rescaled units: stored 300..800
    stored = _gradient(0, 1200)
    decoded = decode_image(write_dicom(tmp_path / "w.dcm", stored, slope=2, intercept=-100, window=(1000, 1000)))
    rescaled = 2 * stored - 100
    assert (decoded[rescaled <= 500] == 0).all()
    assert (decoded[rescaled >= 1500] == 255).all()
    middle = np.abs(rescaled - 1000) <= 2
    assert middle.any() and (np.abs(decoded[middle].astype(int) - 128) <= 2).all()
    inside = (rescaled > 520) & (rescaled < 1480)
    assert np.all(np.diff(decoded[inside]) >= 0)


def test_dicom_laterality_reads_the_tag_only_on_request(tmp_path):
    assert dicom_laterality(write_dicom(tmp_path / "l.dcm", _gradient(0, 99), laterality="L")) == "left"
    assert dicom_laterality(write_dicom(tmp_path / "r.dcm", _gradient(0, 99), laterality="R")) == "right"
    assert dicom_laterality(write_dicom(tmp_path / "n.dcm", _gradient(0, 99))) is None
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((4, 4), np.uint8))
    assert dicom_laterality(tmp_path / "a.png") is None


def test_constant_16bit_image_maps_to_zeros():
    assert not to_uint8(np.full((3, 3), 700, np.uint16)).any()


@pytest.mark.parametrize("name, content, reason", [
    ("missing.png", None, "file not found"),
    ("broken.png", b"this is not a png", "not a decodable PNG"),
    ("broken.dcm", b"\0" * 128 + b"DICM" + b"garbage", "not a decodable DICOM"),
])
def test_undecodable_files_raise_one_line(tmp_path, name, content, reason):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(FsweepError, match=reason) as error:
        decode_image(tmp_path / name)
    assert str(error.value).startswith(str(tmp_path / name)) and "\n" not in str(error.value)


def test_malformed_dicom_window_is_one_line(tmp_path):
    path = write_dicom(tmp_path / "w0.dcm", _gradient(0, 1200), window=(1000, 0))  # width 0: no VOI possible
    with pytest.raises(FsweepError, match="not a decodable DICOM") as error:
        decode_image(path)
    assert "\n" not in str(error.value)


def test_unreadable_file_is_one_line(tmp_path, monkeypatch):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((4, 4), np.uint8))

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))  # what a chmod 000 file gives a non-root user

    monkeypatch.setattr("preprocessing.decode.is_dicom", denied)
    with pytest.raises(FsweepError, match="unreadable file: Permission denied"):
        decode_image(tmp_path / "a.png")


# --- the ingested phantom ------------------------------------------------------------------

def test_dataset_follows_the_contract(tiny_dataset, tiny_phantom):
    table = load_dataset(tiny_dataset)
    assert list(table.columns) == COLUMNS and len(table) == 80
    assert set(table["view"]) == {"left", "right"} and set(table["label"]) == {0, 1}
    assert set(table["split"]) == {"train", "val", "test"}
    assert table["label"].dtype == np.int64 and table["x0"].dtype == np.float64
    assert (table["image_id"] == table["pixel_sha256"].str[:16]).all() and table["image_id"].is_unique
    assert ((table["height"] == 252) & (table["width"] == 148)).all()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in table["image"])
    manifest = pd.read_csv(tiny_phantom / "manifest.csv")
    source = manifest.iloc[table["row"] - 1]  # row numbers are 1-based data rows
    assert np.array_equal(table[["x0", "y0", "x1", "y1"]].to_numpy(), source[["x0", "y0", "x1", "y1"]].to_numpy())
    assert (table["label"].to_numpy() == (source["label"] == "abnormal").to_numpy()).all()
    assert (table["view"].to_numpy() == source["view"].to_numpy()).all()


def test_patient_ids_are_only_stored_as_salted_hashes(tiny_dataset):
    table = load_dataset(tiny_dataset)
    assert table["patient"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert table["patient"].nunique() == 40
    # the phantom's file names carry the id; every other stored value must not
    cells = " ".join(table.drop(columns=["image"]).astype(str).to_numpy().ravel())
    assert "P0001" not in cells
    for name in ("summary.json", "rejected.csv"):
        assert b"P0001" not in (tiny_dataset / name).read_bytes()


def test_summary_counts_and_fingerprint(tiny_dataset):
    table = load_dataset(tiny_dataset)
    summary = json.loads((tiny_dataset / "summary.json").read_text())
    assert summary["accepted"] == 80 and summary["rejected"] == 0 and summary["seed"] == 0
    for (split, view, label), n in table.groupby(["split", "view", "label"]).size().items():
        assert summary["counts"][split][view]["abnormal" if label else "normal"] == n
    assert summary["fingerprint"] == fingerprint(table)
    assert pd.read_csv(tiny_dataset / "rejected.csv").empty


def test_both_views_of_a_patient_share_one_split(tiny_dataset):
    table = load_dataset(tiny_dataset)
    assert (table.groupby("patient")["split"].nunique() == 1).all()
    assert (table.groupby("patient")["view"].nunique() == 2).all()


@pytest.fixture(scope="module")
def hundred(tmp_path_factory) -> Path:
    """A 100-patient phantom of very small images: enough patients to measure stratification."""
    out = tmp_path_factory.mktemp("hundred")
    write_phantom(out, patients=100, seed=5, size=(40, 68))
    return out


def test_split_is_60_20_20_and_stratified(hundred, tmp_path):
    ingest(hundred / "manifest.csv", tmp_path, seed=0, salt="s", echo=False)
    table = load_dataset(tmp_path)
    patients = table.groupby("split")["patient"].nunique()
    assert dict(patients) == {"train": 60, "val": 20, "test": 20}
    overall = table["label"].mean()
    for (split, view), group in table.groupby(["split", "view"]):
        assert abs(group["label"].mean() - overall) <= 0.06, (split, view)


def test_split_is_deterministic_per_seed_and_independent_of_the_salt(hundred, tmp_path):
    def split_of(seed: int, salt: str, name: str) -> pd.DataFrame:
        ingest(hundred / "manifest.csv", tmp_path / name, seed=seed, salt=salt, echo=False)
        return load_dataset(tmp_path / name).set_index("image_id")

    base, again, salted, reseeded = split_of(0, "a", "1"), split_of(0, "a", "2"), split_of(0, "b", "3"), split_of(1, "a", "4")
    assert base.equals(again)
    assert (salted["split"] == base["split"]).all() and (salted["patient"] != base["patient"]).all()
    assert (reseeded["split"] != base["split"]).any()


def test_random_salt_is_kept_private_and_reused(tiny_phantom, tmp_path):
    ingest(tiny_phantom / "manifest.csv", tmp_path / "d", echo=False)
    salt_file = tmp_path / "d" / ".salt"
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    first = load_dataset(tmp_path / "d")["patient"]
    ingest(tiny_phantom / "manifest.csv", tmp_path / "d", echo=False)
    assert load_dataset(tmp_path / "d")["patient"].equals(first)
    ingest(tiny_phantom / "manifest.csv", tmp_path / "other", echo=False)
    assert not load_dataset(tmp_path / "other")["patient"].isin(set(first)).any()
    salt_file.write_text("\n")  # an emptied salt file would hash the ids unsalted: refused
    with pytest.raises(FsweepError, match="empty salt file"):
        ingest(tiny_phantom / "manifest.csv", tmp_path / "d", echo=False)


# --- rejections ---------------------------------------------------------------------------

def _copy_images(phantom: Path, target: Path, count: int) -> list[str]:
    """Distinct phantom images copied under ``target``; returns their names."""
    names = sorted(p.name for p in (phantom / "images").iterdir())[:count]
    for name in names:
        shutil.copy(phantom / "images" / name, target / name)
    return names


def test_every_rejection_reason_is_one_row_and_the_rest_goes_on(tiny_phantom, tmp_path, capsys):
    img = _copy_images(tiny_phantom, tmp_path, 14)
    shutil.copy(tmp_path / img[0], tmp_path / "copy.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    rows = [
        [img[0], "p1", "left", "abnormal", 10, 10, 60, 120],   # 1 ok
        [img[1], "p1", "RIGHT", "Normal", "", "", "", ""],     # 2 ok
        ["nope.png", "p4", "left", "normal", "", "", "", ""],  # 3 missing file
        ["broken.png", "p4", "left", "normal", "", "", "", ""],  # 4 undecodable
        [img[2], "p5", "up", "normal", "", "", "", ""],        # 5 unknown view
        [img[3], "p5", "left", "maybe", "", "", "", ""],       # 6 unknown label
        [img[0], "p6", "left", "normal", "", "", "", ""],      # 7 duplicate: same file as row 1
        ["copy.png", "p6", "left", "normal", "", "", "", ""],  # 8 duplicate: same pixels as row 1
        [img[4], "p2", "left", "normal", "", "", "", ""],      # 9 conflict with row 10
        [img[5], "p2", "left", "abnormal", "", "", "", ""],    # 10 conflict with row 9
        [img[6], "p7", "left", "normal", 0, 0, 9999, 10],      # 11 box outside the image
        [img[7], "p7", "left", "normal", 5, "", "", ""],       # 12 partial box
        [img[8], "p8", "left", "normal", 50, 10, 40, 100],     # 13 x1 <= x0
        [img[9], "", "left", "normal", "", "", "", ""],        # 14 no patient id
        [img[10], "p3", "R", "1", "", "", "", ""],             # 15 ok
        [img[11], "p3", "l", "0", "", "", "", ""],             # 16 ok
        ["", "p9", "left", "normal", "", "", "", ""],          # 17 no image path
        [img[12], "p2", "right", "abnormal", "", "", "", ""],  # 18 ok: p2's right view has one label
    ]
    pd.DataFrame(rows, columns=HEADER).to_csv(tmp_path / "manifest.csv", index=False)
    result = ingest(tmp_path / "manifest.csv", tmp_path / "out", salt="s")
    rejected = pd.read_csv(tmp_path / "out" / "rejected.csv", keep_default_na=False)
    reasons = dict(zip(rejected["row"], rejected["reason"]))
    expected = {
        3: "missing file", 4: "undecodable image", 5: "unknown view", 6: "unknown label",
        7: "duplicate image: same file as row 1", 8: "duplicate image: same pixels as row 1",
        9: "conflicting labels", 10: "conflicting labels", 11: "bad box: 0,0,9999,10 is outside",
        12: "bad box: partial",
        13: "bad box: empty box", 14: "missing patient_id", 17: "missing image path",
    }
    assert sorted(reasons) == sorted(expected)
    for row, reason in expected.items():
        assert reasons[row].startswith(reason), (row, reasons[row])
    assert list(rejected.columns) == ["row", "image", "reason"]
    assert rejected.set_index("row")["image"][9] == img[4], "the manifest's own path text"
    table = load_dataset(tmp_path / "out")
    assert sorted(table["row"]) == [1, 2, 15, 16, 18]
    assert result.accepted == 5 and result.rejected == 13 and result.patients == 3
    assert table.set_index("row").loc[1, ["x0", "y0", "x1", "y1"]].tolist() == [10, 10, 60, 120]
    assert table.set_index("row")["x0"].drop(1).isna().all()
    assert dict(zip(table["row"], table["view"])) == {1: "left", 2: "right", 15: "right", 16: "left", 18: "right"}
    assert dict(zip(table["row"], table["label"])) == {1: 1, 2: 0, 15: 1, 16: 0, 18: 1}
    printed = capsys.readouterr().out
    assert "rejected 13 rows" in printed and "conflicting labels" in printed


# --- a manifest made by someone else --------------------------------------------------------

def _foreign_manifest(phantom: Path, root: Path) -> tuple[pd.DataFrame, set[int]]:
    """20 patients: 8-bit PNG, 16-bit PNG, DICOM MONOCHROME1/2 (12-bit), mixed spellings, broken rows."""
    source = pd.read_csv(phantom / "manifest.csv").head(40)
    (root / "scans").mkdir()
    rows, broken = [], set()
    for number, record in enumerate(source.itertuples(), start=1):
        pixels = cv2.imread(str(phantom / record.image), cv2.IMREAD_UNCHANGED)
        kind = number % 4
        if kind == 0:
            name = f"scans/{number}.png"
            cv2.imwrite(str(root / name), pixels)
        elif kind == 1:
            name = f"scans/{number}_16.png"
            cv2.imwrite(str(root / name), (pixels.astype(np.uint16) * 200 + 1000))
        elif kind == 2:
            name = f"scans/{number}.dcm"
            write_dicom(root / name, 4095 - pixels.astype(np.int64) * 16, "MONOCHROME1")
        else:
            name = f"scans/{number}_mono2.dcm"
            write_dicom(root / name, pixels.astype(np.int64) * 16, "MONOCHROME2", slope=0.5, intercept=-20)
        view = {"left": "L", "right": "r"}[record.view] if number % 3 else record.view.upper()
        label = {"abnormal": "1", "normal": "0"}[record.label] if number % 2 else record.label.capitalize()
        rows.append([name, f"hospital-{record.patient_id}", view, label, record.x0, record.y0, record.x1, record.y1])
    rows[4][0] = "scans/lost.dcm"; broken.add(5)                                    # file is missing
    (root / rows[9][0]).write_bytes((root / rows[9][0]).read_bytes()[:300]); broken.add(10)  # truncated
    rows[14][2] = "oblique"; broken.add(15)                                         # unknown view
    rows[21][3] = "stenosis?"; broken.add(22)                                       # unknown label
    rows[30][6] = 10_000; broken.add(31)                                            # box outside the image
    return pd.DataFrame(rows, columns=HEADER), broken


def test_na_box_cells_mean_no_box(tiny_phantom, tmp_path):
    img = _copy_images(tiny_phantom, tmp_path, 3)
    (tmp_path / "manifest.csv").write_text(  # as R's write.csv and pandas' na_rep write rows without a box
        "image,patient_id,view,label,x0,y0,x1,y1\n"
        f"{img[0]},p1,left,normal,NA,NA,NA,NA\n{img[1]},p1,right,normal,NaN,NaN,NaN,NaN\n"
        f"{img[2]},p2,left,abnormal,NA,1,NA,NA\n"
    )
    result = ingest(tmp_path / "manifest.csv", tmp_path / "out", echo=False)
    assert result.accepted == 2 and result.rejected_by_reason == {"bad box": 1}  # a partial box is still one
    assert load_dataset(tmp_path / "out")[["x0", "y0", "x1", "y1"]].isna().all().all()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "parquet named .csv"])
def test_a_foreign_manifest_rejects_exactly_the_broken_rows(tiny_phantom, tmp_path, fmt):
    manifest, broken = _foreign_manifest(tiny_phantom, tmp_path)
    path = tmp_path / ("manifest.parquet" if fmt == "parquet" else "manifest.csv")
    if fmt == "csv":
        manifest.to_csv(path, index=False)
    else:
        manifest.to_parquet(path, index=False)
    ingest(path, tmp_path / "out", seed=3, echo=False)
    rejected = pd.read_csv(tmp_path / "out" / "rejected.csv")
    table = load_dataset(tmp_path / "out")
    assert set(rejected["row"]) == broken
    assert sorted(table["row"]) == sorted(set(range(1, 41)) - broken)
    assert (table.groupby("patient")["split"].nunique() == 1).all()
    source = pd.read_csv(tiny_phantom / "manifest.csv").head(40)
    for record in table.itertuples():
        original = cv2.imread(str(tiny_phantom / source.image[record.row - 1]), cv2.IMREAD_UNCHANGED)
        assert np.corrcoef(decode_image(record.image).ravel(), original.ravel())[0, 1] > 0.999, record.image
        assert record.label == int(source.label[record.row - 1] == "abnormal")
        assert record.view == source.view[record.row - 1]


def test_no_dicom_header_value_leaves_ingestion(tiny_phantom, tmp_path):
    manifest, _ = _foreign_manifest(tiny_phantom, tmp_path)
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    ingest(tmp_path / "manifest.csv", tmp_path / "out", echo=False)
    table = load_dataset(tmp_path / "out")
    cells = " ".join(table.astype(str).to_numpy().ravel())
    written = b" ".join(p.read_bytes() for p in (tmp_path / "out").iterdir())
    for secret in (*SECRETS, "hospital-P0001"):
        assert secret not in cells and secret.encode() not in written


# --- not a manifest at all ------------------------------------------------------------------

@pytest.mark.parametrize("name, content, reason", [
    ("absent.csv", None, "manifest not found"),
    ("empty.csv", b"", "empty file"),
    ("header.csv", b"image,patient_id,view,label\n", "no data rows"),
    ("columns.csv", b"image,view\na.png,left\n", "missing column\\(s\\) patient_id, label"),
    ("picture.csv", cv2.imencode(".png", np.arange(256, dtype=np.uint8).reshape(16, 16))[1].tobytes(),
     "not a (CSV or Parquet )?manifest|not a manifest"),
    ("broken.parquet", b"PAR1 nonsense", "not a readable Parquet file"),
])
def test_a_file_that_is_not_a_manifest_stops_with_one_line(tmp_path, name, content, reason):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(FsweepError, match=reason) as error:
        ingest(tmp_path / name, tmp_path / "out", echo=False)
    assert "\n" not in str(error.value)


def test_an_unreadable_manifest_stops_with_one_line(tmp_path, monkeypatch):
    (tmp_path / "m.csv").write_text("image,patient_id,view,label\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")  # what a chmod 000 file gives a non-root user

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(FsweepError, match="unreadable manifest .Permission denied"):
        read_manifest(tmp_path / "m.csv")


def test_all_rows_rejected_stops_after_writing_the_reasons(tiny_phantom, tmp_path):
    ingest(tiny_phantom / "manifest.csv", tmp_path / "out", salt="s", echo=False)
    pd.DataFrame([["gone.png", "p", "left", "normal"]], columns=HEADER[:4]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(FsweepError, match="no usable rows"):
        ingest(tmp_path / "m.csv", tmp_path / "out", echo=False)
    assert pd.read_csv(tmp_path / "out" / "rejected.csv")["reason"][0].startswith("missing file")
    assert not (tmp_path / "out" / "dataset.parquet").exists(), "no stale dataset beside the new reasons"


def test_load_dataset_without_ingest_is_one_line(tmp_path):
    with pytest.raises(FsweepError, match="no dataset.parquet"):
        load_dataset(tmp_path)


def test_folds_rotate_test_and_val_at_patient_level_and_stratified(tiny_phantom, tmp_path):
    from preprocessing.splits import dataset_folds, fold_column

    ingest(tiny_phantom / "manifest.csv", tmp_path, seed=0, salt="t", echo=False, folds=5)
    rows = load_dataset(tmp_path)
    assert dataset_folds(rows.columns) == 5 and (rows["split"] == rows[fold_column(0)]).all()
    per_patient = rows.groupby("patient")[[fold_column(k) for k in range(5)]].nunique()
    assert (per_patient == 1).all().all()  # both views of a patient share a split in every fold
    folds = rows.drop_duplicates("patient")[[fold_column(k) for k in range(5)]]
    assert ((folds == "test").sum(axis=1) == 1).all() and ((folds == "val").sum(axis=1) == 1).all()
    for k in range(5):
        share = rows[fold_column(k)].value_counts(normalize=True)
        assert share["train"] == pytest.approx(0.6, abs=0.06) and share["test"] == pytest.approx(0.2, abs=0.06)
        abnormal = rows.groupby(fold_column(k))["label"].mean()
        assert abnormal.max() - abnormal.min() < 0.2  # stratified by label pattern
    with pytest.raises(FsweepError, match="3 or more"):
        ingest(tiny_phantom / "manifest.csv", tmp_path / "two", seed=0, salt="t", echo=False, folds=2)
