"""DICOM as hospitals send it: pydicom's whole test corpus through ingest, and manifests from a folder."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, SecondaryCaptureImageStorage, generate_uid

from cluster.errors import FsweepError
from preprocessing.decode import DecodeError, decode_image, decode_with_warnings
from preprocessing.dicom_manifest import read_labels, view_from_words, write_manifest
from preprocessing.ingest import ingest, load_dataset

import conftest

CORPUS = Path(pydicom.data.__file__).parent / "test_files"  # only what the wheel ships, nothing fetched
# 12-bit JPEG extended (the broken original and its fixed copy) and JPEG-LS: listed first so that
# their lossless twins elsewhere in the corpus (MR_small.dcm ...) are the duplicates, not them
MUST_ACCEPT = ["JPEG-lossy.dcm", "JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "MR_small_jpeg_ls_lossless.dcm"]
EXCEPTION_TEXT = re.compile(r"\b\w+(Error|Exception)\b")


def _corpus() -> list[Path]:
    return [CORPUS / name for name in MUST_ACCEPT] + sorted(
        p for p in CORPUS.iterdir() if p.is_file() and p.name not in MUST_ACCEPT)


def _toolkit_decodes(path: Path) -> bool:
    """The yardstick: pydicom with the installed plugins gives a single-frame ``pixel_array``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dataset = pydicom.dcmread(path, force=True)
            return dataset.pixel_array is not None and int(dataset.get("NumberOfFrames", 1) or 1) == 1
        except Exception:  # any failure means the toolkit does not decode it
            return False


def _headerless(path: Path, stored: np.ndarray) -> Path:
    """A DICOM data set written without preamble or meta header (implicit VR), as old archives hold them."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "DX", *stored.shape, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "MONOCHROME2", 16, 12, 11
    ds.PixelRepresentation, ds.PixelData = 0, stored.astype(np.uint16).tobytes()
    ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


def _mpeg2(path: Path) -> Path:
    """A DICOM file whose pixel data is compressed with a syntax no installed plugin decodes (MPEG2)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = MPEG2MPML
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "DX", 8, 8, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "MONOCHROME2", 8, 8, 7
    ds.PixelRepresentation, ds.PixelData = 0, encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    """pydicom's whole bundled corpus plus three made files, as one manifest, ingested once."""
    root = tmp_path_factory.mktemp("corpus")
    made = [_headerless(root / "IM0001", np.arange(48 * 32).reshape(48, 32) % 4096),
            _mpeg2(root / "video.dcm"), root / "notes.dcm"]
    made[2].write_text("this is a text file that someone named .dcm\n")
    files = _corpus() + made
    rows = [{"image": str(p), "patient_id": f"p{i:03d}", "view": ("left", "right")[i % 2],
             "label": ("normal", "abnormal")[i // 2 % 2]} for i, p in enumerate(files)]
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    result = ingest(root / "manifest.csv", root / "out", salt="t", echo=False)
    return files, result, root / "out"


def test_every_corpus_row_is_accepted_or_rejected_in_plain_words(corpus_run):
    files, result, out = corpus_run
    rejected = pd.read_csv(out / "rejected.csv", keep_default_na=False)
    accepted = load_dataset(out)
    assert len(files) >= 80, "the whole folder, not a sample"
    assert sorted([*rejected["row"], *accepted["row"]]) == list(range(1, len(files) + 1))
    assert result.accepted + result.rejected == len(files)
    for reason in rejected["reason"]:
        assert not EXCEPTION_TEXT.search(reason) and "\n" not in reason, reason


def test_nothing_is_printed_unasked(tmp_path, capfd):
    noisy = ["JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "MR_small_padded.dcm", "badVR.dcm"]
    rows = [{"image": str(CORPUS / name), "patient_id": name, "view": "left", "label": "normal"} for name in noisy]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    result = ingest(tmp_path / "manifest.csv", tmp_path / "out", salt="t", echo=False)
    assert result.accepted == 2 and len(result.warnings) >= 3  # GDCM, openjpeg and pydicom each said something
    assert capfd.readouterr() == ("", "")


def test_jpeg_extended_12bit_and_jpeg_ls_are_accepted(corpus_run):
    files, _, out = corpus_run
    accepted = set(load_dataset(out)["row"])
    for name in MUST_ACCEPT:
        assert [p.name for p in files].index(name) + 1 in accepted, name


def test_all_that_the_toolkit_decodes_is_accepted_unless_a_duplicate(corpus_run):
    files, _, out = corpus_run
    rejected = pd.read_csv(out / "rejected.csv", keep_default_na=False).set_index("row")["reason"]
    toolkit = [row for row, path in enumerate(files, start=1) if _toolkit_decodes(path)]
    assert len(toolkit) >= 50
    for row in toolkit:
        assert row not in rejected or rejected[row].startswith("duplicate image"), (files[row - 1].name, rejected[row])


def test_rejection_reasons_name_what_the_file_is(corpus_run):
    files, result, out = corpus_run
    rejected = pd.read_csv(out / "rejected.csv", keep_default_na=False)
    by_name = {files[row - 1].name: reason for row, reason in zip(rejected["row"], rejected["reason"])}
    assert by_name["rtplan.dcm"] == "no pixel data: RT Plan"
    assert by_name["test-SR.dcm"] == "no pixel data: Comprehensive SR"
    assert by_name["MR_truncated.dcm"].startswith("truncated file")
    assert by_name["rtdose.dcm"] == "multi-frame: 15 frames (one radiograph per row)"
    assert by_name["video.dcm"] == "no decoder: compressed with MPEG2 Main Profile / Main Level"
    assert by_name["notes.dcm"] == "not a DICOM file"
    assert by_name["badVR.dcm"].startswith("undecodable image: not a decodable DICOM image")
    assert "IM0001" not in by_name, "a file without meta header is read"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected_by_reason"] == result.rejected_by_reason
    for kind in ("no pixel data", "truncated file", "multi-frame", "no decoder", "not a DICOM file"):
        assert summary["rejected_by_reason"][kind] >= 1, kind


def test_library_warnings_are_counted_not_printed(corpus_run):
    files, result, out = corpus_run
    noted = pd.read_csv(out / "warnings.csv", keep_default_na=False)
    assert list(noted.columns) == ["row", "image", "warning"]
    names = {files[row - 1].name for row in noted["row"]}
    assert {"JPEG-lossy.dcm", "MR_small_padded.dcm"} <= names  # GDCM's stderr and a pydicom warning
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warnings"] == result.warnings and sum(summary["warnings"].values()) >= 2
    assert not any(re.search(r"\(\d{4},\d{4}\)", kind) for kind in summary["warnings"]), "tags blanked"


def test_decode_error_carries_kind_and_warnings(tmp_path):
    (tmp_path / "text.dcm").write_text("not dicom")
    with pytest.raises(DecodeError) as error:
        decode_image(tmp_path / "text.dcm")
    assert error.value.kind == "not a DICOM file" and str(error.value) == f"{tmp_path / 'text.dcm'}: not a DICOM file"
    with pytest.raises(DecodeError) as error:
        decode_image(CORPUS / "JPEG2000-embedded-sequence-delimiter.dcm")
    assert error.value.kind == "undecodable image" and error.value.warnings, "openjpeg's stderr is kept"
    pixels, heard = decode_with_warnings(CORPUS / "CT_small.dcm")
    assert pixels.dtype == np.uint8 and heard == []


def test_headerless_dicom_decodes_like_the_full_file(tmp_path):
    stored = np.arange(48 * 32).reshape(48, 32) % 4096
    plain = conftest.write_dicom(tmp_path / "full.dcm", stored)
    assert np.array_equal(decode_image(_headerless(tmp_path / "IM0002", stored)), decode_image(plain))


# --- fsweep manifest DIR --labels CSV --out MANIFEST ------------------------------------------------

def _scan(folder: Path, name: str, patient: str, seed: int, **kwargs) -> Path:
    """A 12-bit DICOM file with its own pixels, PatientID ``patient`` and any extra header tags."""
    stored = np.random.default_rng(seed).integers(0, 4096, (40, 30))
    laterality = kwargs.pop("laterality", None)
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return conftest.write_dicom(path, stored, laterality=laterality, headers={"PatientID": patient, **kwargs})


@pytest.fixture
def hospital(tmp_path):
    """A folder as a hospital exports it, and the user's labels table."""
    scans = tmp_path / "export"
    _scan(scans, "a.dcm", "P1", 1, laterality="L")
    _scan(scans, "b.dcm", "P1", 2, SeriesDescription="C-SPINE RAO")  # view from the series words
    _scan(scans, "c.dcm", "P2", 3)  # no laterality, no words
    _scan(scans, "sub/IM0004", "P3", 4, laterality="R")  # no suffix; P3 is not in the labels table
    _scan(scans, "e.dcm", "P2", 5, Laterality="R")  # P2 has no label for the right view
    _scan(scans, "f.dcm", "P4", 6, ViewPosition="LL")
    _scan(scans, "g.dcm", "", 7, laterality="L")  # no PatientID
    (scans / "notes.txt").write_text("export log\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,view,label\nP1,left,abnormal\nP1,R,normal\nP2,left,1\nP4,L,normal\n")
    return scans, labels


def test_manifest_places_files_by_header_and_labels(hospital, tmp_path):
    scans, labels = hospital
    summary = write_manifest(scans, labels, tmp_path / "out" / "manifest.csv")
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv", keep_default_na=False)
    assert list(manifest.columns) == ["image", "patient_id", "view", "label"]
    assert manifest.values.tolist() == [
        ["../export/a.dcm", "P1", "left", "abnormal"],
        ["../export/b.dcm", "P1", "right", "normal"],
        ["../export/f.dcm", "P4", "left", "normal"],
    ]
    unplaced = pd.read_csv(tmp_path / "out" / "manifest_unplaced.csv", keep_default_na=False)
    assert dict(zip(unplaced["file"], unplaced["reason"])) == {
        "../export/c.dcm": "no laterality or view words",
        "../export/e.dcm": "no label for the patient's right view",
        "../export/g.dcm": "no PatientID",
        "../export/notes.txt": "not a DICOM file",
        "../export/sub/IM0004": "patient not in labels table",
    }
    assert summary == {
        "manifest": str(tmp_path / "out" / "manifest.csv"),
        "unplaced_csv": str(tmp_path / "out" / "manifest_unplaced.csv"),
        "files": 8, "placed": 3, "unplaced": 5,
        "unplaced_by_reason": {"no PatientID": 1, "no label for the patient's right view": 1,
                               "no laterality or view words": 1, "not a DICOM file": 1,
                               "patient not in labels table": 1},
        "patients": 2, "views": {"left": 2, "right": 1}, "warnings": 0,
    }
    result = ingest(tmp_path / "out" / "manifest.csv", tmp_path / "dataset", salt="t", echo=False)
    assert result.accepted == 3 and result.rejected == 0


def test_manifest_command_prints_counts_and_refuses_bad_input(hospital, tmp_path, capsys):
    from fsweep.cli import main

    scans, labels = hospital
    assert main(["manifest", str(scans), "--labels", str(labels), "--out", str(tmp_path / "m.csv")]) == 0
    out = capsys.readouterr().out
    assert "3 of 8 files placed" in out and "5 files not placed" in out and "m_unplaced.csv" in out
    assert main(["manifest", str(tmp_path / "nowhere"), "--labels", str(labels), "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fsweep manifest: error:") and "nowhere" in err and len(err.splitlines()) == 1


def test_manifest_inside_the_folder_is_not_read_back(hospital):
    scans, labels = hospital
    write_manifest(scans, labels, scans / "manifest.csv")
    again = write_manifest(scans, labels, scans / "manifest.csv")
    assert again["files"] == 8 and again["placed"] == 3
    assert pd.read_csv(scans / "manifest.csv")["image"].iloc[0] == "a.dcm"


@pytest.mark.parametrize("text, view", [
    ("C-SPINE LAO", "left"), ("oblique right", "right"), ("L SPINE", None), ("LEFT and RIGHT", None), ("", None),
])
def test_view_words(text, view):
    header = Dataset()
    header.SeriesDescription = text
    assert view_from_words(header) == view


@pytest.mark.parametrize("what, message", [
    ("no folder", "folder not found"),
    ("no columns", "missing column(s) view, label"),
    ("bad label", "row 2: unknown label 'maybe'"),
    ("conflict", "row 2: patient 'P1' left view is labelled both abnormal and normal"),
])
def test_bad_manifest_inputs_are_one_line(hospital, tmp_path, what, message):
    scans, labels = hospital
    table = {"no columns": "patient_id,diagnosis\nP1,x\n", "bad label": "patient_id,view,label\nP1,L,1\nP2,L,maybe\n",
             "conflict": "patient_id,view,label\nP1,L,1\nP1,left,normal\n"}.get(what)
    if table is not None:
        labels.write_text(table)
    folder = tmp_path / "nowhere" if what == "no folder" else scans
    with pytest.raises(FsweepError, match=re.escape(message)) as error:
        write_manifest(folder, labels, tmp_path / "m.csv")
    assert "\n" not in str(error.value)


def test_labels_table_spellings(hospital):
    _, labels = hospital
    assert read_labels(labels) == {("P1", "left"): "abnormal", ("P1", "right"): "normal",
                                   ("P2", "left"): "abnormal", ("P4", "left"): "normal"}
