"""The preprocessing store: HE, variant keys, builds (reuse, interruption, corruption) and the loader."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import ray
import torch

from preprocessing.contrast import equalize, equalize_reference
from preprocessing.decode import decode_image
from cluster.errors import FsweepError
from preprocessing.loader import eval_set, train_set
from preprocessing.recipe import preprocess_image, variant_key, VariantSpec
from conftest import make_spec
from preprocessing.store import build_store, build_variant
from preprocessing.variant import open_variant
from preprocessing.vocab import SPLITS, VIEWS
from fsweep.cli import main as fsweep

SIZE = 48  # tiny arrays keep the builds to a couple of seconds


@pytest.fixture(scope="module", autouse=True)
def _builds_share_one_ray(local_ray):
    """The builds reuse the test process's small local Ray (conftest.local_ray) instead of starting their own."""


@pytest.fixture(scope="module")
def built(tiny_dataset, tmp_path_factory):
    """A store with the off and global variants of the tiny data set."""
    store = tmp_path_factory.mktemp("store")
    variants = build_store(tiny_dataset, store, roi="none", size=SIZE, recipes=[("off", "pad"), ("global", "pad")], margin=0.05)
    return store, variants


def phantom_like(rng: np.random.Generator) -> np.ndarray:
    """A radiograph-like image: dark background, a narrow grey range, bright shapes, noise."""
    img = np.full((90, 70), 60, np.float64)
    cv2.rectangle(img, (20, 10), (45, 80), 95, -1)
    cv2.circle(img, (35, 40), 8, 75, -1)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


# --- contrast ------------------------------------------------------------------------------

def test_global_he_equals_the_papers_equations(tiny_dataset):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64), dtype=np.uint8), rng.integers(40, 90, (37, 101), dtype=np.uint8),
              phantom_like(rng)]
    images.append(decode_image(pd.read_parquet(tiny_dataset / "dataset.parquet")["image"].iloc[0]))
    for img in images:
        np.testing.assert_array_equal(equalize(img, "global"), equalize_reference(img))


def test_he_modes():
    img = phantom_like(np.random.default_rng(1))
    assert equalize(img, "off") is img
    flat = equalize(img, "global")
    # equalization spreads a narrow grey range over (almost) the whole scale
    assert np.ptp(img) < 100 and np.ptp(flat) > 200
    clahe = equalize(img, "clahe")
    assert clahe.dtype == np.uint8 and clahe.shape == img.shape and not np.array_equal(clahe, img)
    with pytest.raises(FsweepError, match="unknown histogram"):
        equalize(img, "local")
    with pytest.raises(FsweepError, match="2-D uint8"):
        equalize(img.astype(np.uint16), "global")


# --- variant keys --------------------------------------------------------------------------

def test_key_changes_with_every_parameter_and_only_then(tiny_dataset, tmp_path):
    roi_a, roi_b = tmp_path / "roi_a", tmp_path / "roi_b"
    for roi, payload in ((roi_a, b"weights A"), (roi_b, b"weights B")):
        roi.mkdir()
        (roi / "best.pt").write_bytes(payload)  # the key hashes the weights' bytes, without loading them
    base = make_spec(he="global", size=SIZE, aspect="pad", roi_dir=str(roi_a), margin=0.05)
    key = variant_key(tiny_dataset, base)
    assert variant_key(tiny_dataset, VariantSpec(**vars(base))) == key
    changed = [
        make_spec(he="clahe", size=SIZE, aspect="pad", roi_dir=str(roi_a), margin=0.05),
        make_spec(he="global", size=SIZE + 1, aspect="pad", roi_dir=str(roi_a), margin=0.05),
        make_spec(he="global", size=SIZE, aspect="stretch", roi_dir=str(roi_a), margin=0.05),
        make_spec(he="global", size=SIZE, aspect="pad", roi_dir=str(roi_b), margin=0.05),
        make_spec(he="global", size=SIZE, aspect="pad", roi_dir=str(roi_a), margin=0.1),
        make_spec(he="global", size=SIZE, aspect="pad", roi_dir=None, margin=0.05),
    ]
    keys = {variant_key(tiny_dataset, spec) for spec in changed}
    assert len(keys) == len(changed) and key not in keys
    # a copied detector (same bytes elsewhere) is the same detector
    roi_copy = tmp_path / "roi_copy"
    shutil.copytree(roi_a, roi_copy)
    assert variant_key(tiny_dataset, make_spec(he="global", size=SIZE, aspect="pad", roi_dir=str(roi_copy))) == key
    # without a detector nothing is cropped, so the margin cannot change the arrays
    no_roi = make_spec(he="global", size=SIZE)
    wide = make_spec(he="global", size=SIZE, margin=0.2)
    assert variant_key(tiny_dataset, no_roi) == variant_key(tiny_dataset, wide)
    # the data: one label flipped is another variant
    other = tmp_path / "dataset"
    other.mkdir()
    rows = pd.read_parquet(tiny_dataset / "dataset.parquet")
    rows.loc[0, "label"] = 1 - rows.loc[0, "label"]
    rows.to_parquet(other / "dataset.parquet")
    assert variant_key(other, no_roi) != variant_key(tiny_dataset, no_roi)


def test_bad_spec_is_a_one_line_error(tiny_dataset):
    with pytest.raises(FsweepError, match="aspect='crop'"):
        variant_key(tiny_dataset, make_spec(aspect="crop"))


# --- building ------------------------------------------------------------------------------

def test_build_writes_the_layout_and_the_recipe(built, tiny_dataset):
    store, (off, glob) = built
    rows = pd.read_parquet(tiny_dataset / "dataset.parquet")
    assert off.key != glob.key and off.preprocessed == glob.preprocessed == len(rows)
    for split in SPLITS:
        for view in VIEWS:
            expected = rows[(rows["split"] == split) & (rows["view"] == view)]
            images = glob.images(split, view)
            assert images.dtype == np.uint8 and images.shape == (len(expected), SIZE, SIZE)
            assert sorted(glob.image_ids(split, view)) == sorted(expected["image_id"])
            labels = expected.set_index("image_id")["label"].loc[glob.image_ids(split, view)]
            np.testing.assert_array_equal(glob.labels(split, view), labels.to_numpy())
    meta = json.loads((glob.path / "variant.json").read_text())
    built_on = json.loads((glob.path / "build.json").read_text())["built_on"]  # provenance, outside the checked bytes
    assert sum(built_on.values()) == len(rows) and meta["spec"]["he"] == "global"
    assert meta["dataset"]["fingerprint"] == json.loads((tiny_dataset / "summary.json").read_text())["fingerprint"]
    assert sorted(p.name for p in glob.path.iterdir()) == [
        ".verified", "build.json", "index.parquet", "manifest.json",
        *sorted(f"{s}_{v}.npy" for s in SPLITS for v in VIEWS), "variant.json",
    ]
    checked = json.loads((glob.path / "manifest.json").read_text())["sha256"]
    assert "build.json" not in checked and "variant.json" in checked
    # the stored array is the recipe applied to the raw file
    image_id = glob.image_ids("val", "right")[2]
    path = rows.set_index("image_id").loc[image_id, "image"]
    np.testing.assert_array_equal(glob.images("val", "right")[2], preprocess_image(path, glob.spec))
    assert not glob.index["fallback"].any()


def test_second_build_does_no_preprocessing(built, tiny_dataset, capsys):
    store, first = built
    again = build_store(tiny_dataset, store, roi="none", size=SIZE, recipes=[("off", "pad"), ("global", "pad")], margin=0.05)
    assert [v.key for v in again] == [v.key for v in first]
    assert [v.preprocessed for v in again] == [0, 0]
    assert capsys.readouterr().out.count("up to date: no work") == 2
    args = ["store", "build", str(tiny_dataset), "--store", str(store), "--size", str(SIZE), "--he", "global",
            "--set", "space.aspect=pad"]
    assert fsweep(args) == 0
    assert "up to date: no work" in capsys.readouterr().out


def test_a_mode_given_twice_is_built_once(tiny_dataset, tmp_path):
    first, second = build_store(tiny_dataset, tmp_path, roi="none", size=SIZE, recipes=[("off", "pad"), ("off", "pad")], margin=0.05)
    assert first.key == second.key and first.preprocessed == len(first.index)
    assert not list(first.path.glob(".*.tmp"))


def test_corrupted_array_is_refused_then_rebuilt(tiny_dataset, tmp_path):
    spec = make_spec(he="off", size=SIZE)
    variant = build_variant(tiny_dataset, tmp_path, spec)
    clean = np.array(variant.images("train", "left"))
    target = variant.path / "train_left.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    open_variant(tmp_path, variant.key)  # an open's cheap check sees sizes, not a same-size bit flip ...
    with pytest.raises(FsweepError, match="train_left.npy: checksum mismatch"):
        open_variant(tmp_path, variant.key, full=True)  # ... the full one (every build runs it) does
    rebuilt = build_variant(tiny_dataset, tmp_path, spec)
    assert rebuilt.preprocessed == len(variant.index)
    np.testing.assert_array_equal(open_variant(tmp_path, variant.key).images("train", "left"), clean)
    manifest = variant.path / "manifest.json"
    manifest.write_text(manifest.read_text()[:20])  # a truncated manifest is refused as well, then rebuilt
    with pytest.raises(FsweepError, match="manifest.json: unreadable"):
        open_variant(tmp_path, variant.key)
    assert build_variant(tiny_dataset, tmp_path, spec).preprocessed == len(variant.index)


def test_interrupted_build_is_refused_then_completed(tiny_dataset, tmp_path):
    spec = make_spec(he="clahe", size=256, aspect="stretch")  # larger arrays: the build lasts long enough to be killed
    key = variant_key(tiny_dataset, spec)
    script = (
        "import sys; from preprocessing.recipe import VariantSpec; from preprocessing.store import build_variant; "
        "build_variant(sys.argv[1], sys.argv[2], VariantSpec(he='clahe', size=256, aspect='stretch', roi_dir=None, margin=0.05))"
    )
    # the child joins this module's Ray, so killing it leaves no Ray cluster behind
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    child = subprocess.Popen([sys.executable, "-c", script, str(tiny_dataset), str(tmp_path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    variant_dir = tmp_path / key
    deadline = time.monotonic() + 120
    while not list(variant_dir.glob(".*.tmp")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert list(variant_dir.glob(".*.tmp")), "the build was not caught mid-way"
    assert not (variant_dir / "manifest.json").exists()
    with pytest.raises(FsweepError, match="incomplete"):
        open_variant(tmp_path, key)
    variant = build_variant(tiny_dataset, tmp_path, spec)
    assert variant.preprocessed == len(variant.index)
    assert not list(variant_dir.glob(".*.tmp"))  # the killed builder's temp files are gone
    assert open_variant(tmp_path, key).images("test", "left").shape[1:] == (256, 256)


def test_racing_builders_leave_one_verified_variant(tiny_dataset, tmp_path):
    spec = make_spec(he="clahe", size=SIZE, aspect="stretch")
    script = (
        "import sys; from preprocessing.recipe import VariantSpec; from preprocessing.store import build_variant; "
        "build_variant(sys.argv[1], sys.argv[2], VariantSpec(he='clahe', size=int(sys.argv[3]), aspect='stretch', roi_dir=None, margin=0.05))"
    )
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    builders = [subprocess.Popen([sys.executable, "-c", script, str(tiny_dataset), str(tmp_path), str(SIZE)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [builder.communicate(timeout=300) for builder in builders]
    assert all(builder.returncode == 0 for builder in builders), [err[-2000:] for _, err in outputs]
    said = sorted("up to date" in out for out, _ in outputs)
    assert said == [False, True], outputs  # the lock: one builds, the other waits, then reuses
    variant = open_variant(tmp_path, variant_key(tiny_dataset, spec), full=True)
    assert not list(variant.path.glob(".*.tmp"))
    rows = pd.read_parquet(tiny_dataset / "dataset.parquet").set_index("image_id")
    image_id = variant.image_ids("train", "right")[0]
    expected = preprocess_image(rows.loc[image_id, "image"], spec)
    np.testing.assert_array_equal(variant.images("train", "right")[0], expected)


def test_variant_json_is_deterministic_and_opens_hash_only_the_manifest(tiny_dataset, tmp_path, monkeypatch):
    import preprocessing.artifact as artifact

    spec = make_spec(he="off", size=SIZE)
    variant = build_variant(tiny_dataset, tmp_path, spec)
    first = {name: (variant.path / name).read_bytes() for name in ("variant.json", "index.parquet", "manifest.json")}
    (variant.path / "manifest.json").unlink()  # a second build (another node, another time) ...
    assert build_variant(tiny_dataset, tmp_path, spec).preprocessed == len(variant.index)
    for name, data in first.items():  # ... writes the same checked bytes: readers never see a mismatch
        assert (variant.path / name).read_bytes() == data, name
    hashed = []
    real = artifact.file_sha256
    monkeypatch.setattr(artifact, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    opened = open_variant(tmp_path, variant.key)
    assert set(hashed) == {"manifest.json"}  # an open is cheap: sizes and the manifest's hash
    (variant.path / ".verified").unlink()  # e.g. a node's fresh download: one full check, then cheap again
    hashed.clear()
    open_variant(tmp_path, variant.key)
    assert {"train_left.npy", "index.parquet"} <= set(hashed)
    hashed.clear()
    open_variant(tmp_path, variant.key, expected=opened.manifest)
    assert set(hashed) == {"manifest.json"}
    with pytest.raises(FsweepError, match="differs from the one the experiment recorded") as error:
        open_variant(tmp_path, variant.key, expected="0" * 64)
    assert "\n" not in str(error.value)
    target = variant.path / "test_right.npy"
    target.write_bytes(target.read_bytes()[:-10])  # truncated after the build: every open sees it
    with pytest.raises(FsweepError, match="test_right.npy: size differs"):
        open_variant(tmp_path, variant.key)


def test_an_image_gone_since_ingest_is_a_one_line_error(tiny_dataset, tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    rows = pd.read_parquet(tiny_dataset / "dataset.parquet")
    rows.loc[0, "image"] = str(tmp_path / "gone.png")
    rows.to_parquet(dataset / "dataset.parquet")
    with pytest.raises(FsweepError, match="gone.png: file not found") as error:
        build_variant(dataset, tmp_path / "store", make_spec(he="off", size=SIZE))
    assert "\n" not in str(error.value)  # the task's reason, not the Ray worker's traceback
    assert not list((tmp_path / "store").glob("*/.*.tmp"))


def test_uri_store_is_uploaded_manifest_last_and_read_from_a_node_cache(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("FSWEEP_CACHE", str(tmp_path / "node_cache"))
    uri = f"file://{tmp_path / 'bucket'}"  # the pyarrow code path of s3:// and gs://
    spec = make_spec(he="global", size=SIZE)
    built = build_variant(tiny_dataset, uri, spec)
    remote = tmp_path / "bucket" / built.key
    def names(path):
        return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))

    assert names(remote) == names(built.path) and not (remote / ".verified").exists()  # node state stays home
    again = build_variant(tiny_dataset, uri, spec)
    assert again.preprocessed == 0 and again.path.is_relative_to(tmp_path / "node_cache")
    np.testing.assert_array_equal(again.images("val", "left"), built.images("val", "left"))
    with pytest.raises(FsweepError, match="not built"):
        open_variant(uri, "0123456789abcdef")
    cached = again.path / "val_left.npy"
    cached.write_bytes(cached.read_bytes()[:-1])  # this node's copy goes bad: it is fetched again, not refused for good
    np.testing.assert_array_equal(open_variant(uri, built.key).images("val", "left"), built.images("val", "left"))


# --- loader --------------------------------------------------------------------------------

def test_flip_doubles_the_training_set_from_train_images_only(built):
    _, (_, variant) = built
    index = variant.index
    held_out = index[index["split"] != "train"]
    for view, other in (("right", "left"), ("left", "right")):
        plain, flipped = train_set(variant, view, flip=False), train_set(variant, view, flip=True)
        n_view, n_other = len(variant.labels("train", view)), len(variant.labels("train", other))
        assert len(plain) == n_view and len(flipped) == n_view + n_other
        np.testing.assert_array_equal(
            flipped.labels, np.concatenate([variant.labels("train", view), variant.labels("train", other)])
        )
        image, label = flipped[n_view]  # the first mirrored image: the other view's first, left-right flipped
        assert image.dtype == torch.uint8 and tuple(image.shape) == (1, SIZE, SIZE)
        np.testing.assert_array_equal(image[0].numpy(), variant.images("train", other)[0][:, ::-1])
        assert label == float(variant.labels("train", other)[0])
        assert not set(flipped.image_ids) & set(held_out["image_id"])
        train_patients = set(index.set_index("image_id").loc[flipped.image_ids, "patient"])
        assert not train_patients & set(held_out["patient"])
    both = train_set(variant, "both", flip=True)
    n_train = int((index["split"] == "train").sum())
    assert len(both) == 2 * n_train and int(both.mirrored.sum()) == n_train


def test_eval_set_is_one_split_never_mirrored(built):
    _, (_, variant) = built
    for split in ("val", "test"):
        data = eval_set(variant, "both", split)
        assert not data.mirrored.any()
        assert sorted(data.image_ids) == sorted(variant.index.loc[variant.index["split"] == split, "image_id"])
        image, _ = data[0]
        np.testing.assert_array_equal(image[0].numpy(), variant.images(split, "left")[0])
    with pytest.raises(FsweepError, match="view='top'"):
        eval_set(variant, "top", "val")



# --- the frozen STN as a store artifact -------------------------------------------------------

def test_stn_grid_and_sampling_stay_float32_under_autocast():
    from fsmodels.stn import STN

    torch.manual_seed(0)
    stn = STN().eval()
    with torch.no_grad():
        stn.regressor[2].weight.normal_(0, 0.05)  # a theta that depends on the image, as after pretraining
        x = torch.rand(2, 1, 64, 64)
        plain = stn(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = stn(x)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)  # bf16 theta would move the samples


def test_frozen_stn_is_keyed_checksummed_and_shared_through_a_uri_store(tiny_dataset, tmp_path, monkeypatch):
    import fsmodels.stn as stn_module
    from fsmodels.stn import STN_STATS, ensure_frozen_stn, open_stn, stn_key

    monkeypatch.setenv("FSWEEP_CACHE", str(tmp_path / "node_a"))
    uri = f"file://{tmp_path / 'bucket'}"
    variant = build_variant(tiny_dataset, uri, make_spec(he="global", size=64))
    assert len({stn_key(variant.key, 2, 0), stn_key(variant.key, 2, 1), stn_key(variant.key, 3, 0)}) == 3
    trained = []
    real = stn_module.pretrain_stn
    monkeypatch.setattr(stn_module, "pretrain_stn", lambda *a, **k: trained.append(1) or real(*a, **k))
    first = ensure_frozen_stn(variant, epochs=2, seed=1, store=uri)
    remote = tmp_path / "bucket" / "stn" / first.key
    assert (remote / "manifest.json").is_file() and not (remote / ".verified").exists()  # uploaded, manifest last
    stats = json.loads((first.path / STN_STATS).read_text())
    assert stats["seed"] == 1 and stats["variant"] == variant.key and stats["theta"]["det"]["mean"] > 0
    monkeypatch.setenv("FSWEEP_CACHE", str(tmp_path / "node_b"))  # another node: downloads it, never retrains
    again = ensure_frozen_stn(variant, epochs=2, seed=1, store=uri)
    assert trained == [1] and again.path.is_relative_to(tmp_path / "node_b")
    assert again.manifest == first.manifest and again.weights.read_bytes() == first.weights.read_bytes()
    with pytest.raises(FsweepError, match="differs from the one the experiment recorded"):
        open_stn(uri, first.key, expected="f" * 64)
    with pytest.raises(FsweepError, match="frozen STN not built"):
        open_stn(uri, stn_key(variant.key, 2, 7))
    stn_module.pretrain_stn_cli(uri, variant=None, epochs=2, seed=1)  # `fsweep stn train s3://...` lists the variants
    assert trained == [1]  # and reuses the uploaded STN


def test_a_trial_needs_only_the_store_and_its_recorded_handles(tiny_dataset, tmp_path):
    from fsmodels.config import load_config
    from fsmodels.params import trial_handles, trial_params
    from fsmodels.train import run_trial

    store = tmp_path / "store"
    build_variant(tiny_dataset, store, make_spec(he="global", size=64))
    sets = [f"data.dataset={tiny_dataset}", f"data.store={store}", "data.size=64", "space.backbone=test_resnet",
            "space.view=right", "space.epochs=1", "space.batch_size=8", "space.stn=frozen", "space.seed=3",
            "train.pretrained=none", "train.stn_epochs=1"]
    cfg = load_config(None, sets)
    handles = trial_handles(cfg, trial_params(cfg))  # the driver's step: keys resolved once, from DATASET
    elsewhere = load_config(None, [*sets, f"data.dataset={tmp_path / 'gone'}", f"roi.detector={tmp_path / 'gone'}"])
    result = run_trial(elsewhere, tmp_path / "trial", handles=handles)  # no DATASET, no detector: only the store
    assert result["variant"] == handles["variant"]["key"] and result["best_epoch"] == 1
    recorded = torch.load(Path(result["checkpoint"]) / "state.pt", weights_only=True)["artifacts"]
    assert recorded == handles  # the checkpoint carries the handles: evaluation and export open the same ones
    other_seed = load_config(None, [*sets, "space.seed=4"])
    assert trial_handles(other_seed, trial_params(other_seed))["stn"]["key"] != handles["stn"]["key"]  # seed -> STN
