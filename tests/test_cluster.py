"""cluster: connecting, storage, and fsweep on a real multi-node Ray on one machine.

One ``ray.cluster_utils.Cluster`` for the module: a head and two workers of one CPU
each (one worker also declares a GPU, to see it reported). The data: 40 phantom
patients at the phantom's full size, rewritten as DICOM files whose headers carry
known identifiers; the pipeline runs through the ``fsweep`` command line against the
cluster. Node loss is a real ``Cluster.remove_node`` (processes killed, no grace).
A killed driver and ``fsweep resume`` are tested in tests/test_search.py
(``test_resume_after_killed_driver_keeps_completed_trials_and_optuna_state``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import psutil
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from cluster import storage
from cluster.connect import PROJECT_ROOT, connect, describe
from cluster.errors import FsweepError
from cluster.ray_internals import dashboard_url, raylet_process, token_auth, validate_launcher_config
from preprocessing.phantom import write_phantom
from preprocessing.recipe import preprocess_image, variant_key
from preprocessing.store import build_variant
from preprocessing.variant import open_variant

from conftest import make_spec, tiny_sweep_config, write_dicom

PATIENTS = 40  # both classes in every split of a patient-level 60/20/20 split
CHUNK_TASK = "ray::_process_chunk"  # process title of a Ray worker running a store build task
# Identifiers written into the DICOM headers and the manifest; none may leave the input files.
PATIENT_NAME = "Qzvxarian^Wolfgrith{:02d}"
PATIENT_ID = "ZQPID-{:04d}"
HEADER_VALUES = {"InstitutionName": "Vexholm Qarrow Hospital", "ReferringPhysicianName": "Drelvik^Osmund",
                 "AccessionNumber": "ACCQZ91827", "PatientBirthDate": "19230117"}
NEEDLES = [b"qzvxarian", b"wolfgrith", b"zqpid", b"vexholm", b"drelvik", b"accqz91827", b"19230117"]


# --- the cluster ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    """A head and two one-CPU workers (the second with a declared GPU); this process is its driver."""
    if ray.is_initialized():
        ray.shutdown()  # another module's private Ray: this module needs its own cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def raylet_children(node) -> list[psutil.Process]:
    """The worker processes of one simulated node (children of its raylet)."""
    raylet = raylet_process(node)
    try:
        return psutil.Process(raylet.pid).children()
    except psutil.Error:
        return []


def runs_task(node, title: str) -> bool:
    """True when a worker of ``node`` is executing a task whose process title starts with ``title``."""
    for child in raylet_children(node):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if cmdline and cmdline[0].startswith(title):
            return True
    return False


class TaskNodeKiller(threading.Thread):
    """Removes (kills, no grace) the first worker node seen running a task whose process title starts with ``title``."""

    def __init__(self, cluster: Cluster, title: str):
        super().__init__(daemon=True)
        self.cluster, self.title = cluster, title
        self.removed = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and self.removed is None:
            for node in list(self.cluster.worker_nodes):
                if runs_task(node, self.title):
                    self.cluster.remove_node(node, allow_graceful=False)
                    self.removed = node
                    return
            time.sleep(0.01)

    def __enter__(self) -> TaskNodeKiller:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()


def replace_removed_node(cluster: Cluster, killer) -> None:
    """Give the module's cluster its third node back after a removal test."""
    if killer.removed is not None:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()


# --- data: DICOM files with known identifiers -------------------------------------------

def write_patient_dicom(path: Path, pixels: np.ndarray, patient: int) -> None:
    """A 12-bit MONOCHROME2 DICOM file carrying this patient's name, id and other header values."""
    headers = {"PatientName": PATIENT_NAME.format(patient), "PatientID": PATIENT_ID.format(patient), **HEADER_VALUES}
    write_dicom(path, pixels.astype(np.uint16) * 16, headers=headers)


@pytest.fixture(scope="module")
def dicom_inputs(tmp_path_factory) -> Path:
    """inputs/manifest.csv + scans/img_NNN.dcm: the phantom as DICOM, raw ids in headers and manifest."""
    phantom = tmp_path_factory.mktemp("phantom_png")
    write_phantom(phantom, patients=PATIENTS, seed=0)
    inputs = tmp_path_factory.mktemp("inputs")
    (inputs / "scans").mkdir()
    rows = pd.read_csv(phantom / "manifest.csv")
    for number, row in enumerate(rows.itertuples()):
        pixels = cv2.imread(str(phantom / row.image), cv2.IMREAD_GRAYSCALE)
        patient = int(row.patient_id.removeprefix("P"))
        write_patient_dicom(inputs / "scans" / f"img_{number:03d}.dcm", pixels, patient)
        rows.loc[row.Index, ["image", "patient_id"]] = f"scans/img_{number:03d}.dcm", PATIENT_ID.format(patient)
    rows.to_csv(inputs / "manifest.csv", index=False)
    return inputs


def fsweep(*args: str, env: dict | None = None) -> str:
    """Run the ``fsweep`` command line; its stdout and stderr together (the logs a user sees)."""
    done = subprocess.run(
        [sys.executable, "-m", "fsweep.cli", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, timeout=400,
    )
    assert done.returncode == 0, f"fsweep {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


# --- connecting -------------------------------------------------------------------------

def listening_addresses(process: psutil.Process) -> set[str]:
    """Local addresses of the listening TCP sockets of ``process`` and its descendants."""
    found = set()
    for proc in [process, *process.children(recursive=True)]:
        try:
            found |= {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return found


def test_local_ray_listens_on_loopback_only_without_dashboard_and_with_token_auth(monkeypatch):
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        info = connect(num_cpus=1)
        assert info["nodes"] == 1 and info["cpus"] == 1.0 and info["gpus"] == 0.0
        assert connect() == describe()  # idempotent: still the same single node
        addresses = listening_addresses(psutil.Process())
        assert addresses, "Ray's services should be listening somewhere"
        assert all(a in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for a in addresses), addresses
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        assert not dashboard_url()  # dashboard off
        assert token_auth()
    finally:
        ray.shutdown()


SHIP_PROBE = """
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from cluster.connect import connect

info = connect()  # no --address: RAY_ADDRESS (as `ray job submit` sets it) names the cluster

@ray.remote(num_cpus=0)
def where():
    import fsmodels
    return ray.get_runtime_context().get_node_id(), fsmodels.__file__

refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
        for n in info["node_ids"]]
print(json.dumps({"info": info, "where": ray.get(refs)}))
"""


def test_connect_reports_the_cluster_and_ships_the_project_to_every_node(ray_cluster, tmp_path):
    info = connect()  # already connected by the fixture: reports, changes nothing
    nodes = [ray_cluster.head_node, *ray_cluster.worker_nodes]
    assert info["nodes"] == 3 and info["cpus"] == 3.0 and info["gpus"] == 1.0
    assert sorted(info["node_ids"]) == sorted(n.node_id for n in nodes)
    # A second driver joins from outside the source tree, as a job on the cluster would.
    done = subprocess.run([sys.executable, "-c", SHIP_PROBE], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "RAY_ADDRESS": ray_cluster.address})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ray: 3 nodes, 3 CPUs, 1 GPUs" in done.stderr
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(node for node, _ in probe["where"]) == sorted(info["node_ids"])
    for _, module in probe["where"]:  # each node imported the shipped copy, not this checkout
        assert "runtime_resources" in module and not module.startswith(str(PROJECT_ROOT)), module


# --- storage ----------------------------------------------------------------------------

def test_storage_paths_become_absolute_and_uris_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve_storage(None) == str(tmp_path / "runs")
    assert storage.resolve_storage("exp/") == str(tmp_path / "exp")
    assert storage.resolve_storage("s3://bucket/fsweep/") == "s3://bucket/fsweep"
    assert storage.join("gs://bucket/a", "/b/", "c") == "gs://bucket/a/b/c"
    assert storage.join("/shared/runs", "exp") == "/shared/runs/exp"
    with pytest.raises(FsweepError, match="ftp://host/x: unsupported storage scheme"):
        storage.resolve_storage("ftp://host/x")
    fs, path = storage.open_filesystem(f"file://{tmp_path}")
    assert type(fs).__name__ == "LocalFileSystem" and path == str(tmp_path)
    assert storage.exists(f"file://{tmp_path}") and not storage.exists(f"file://{tmp_path}/missing")


def test_cached_copy_downloads_a_uri_once_per_node_even_when_asked_concurrently(tmp_path, monkeypatch):
    import pyarrow.fs

    remote = tmp_path / "bucket" / "variant"
    (remote / "stn").mkdir(parents=True)
    (remote / "train_left.npy").write_bytes(os.urandom(50_000))
    (remote / "stn" / "weights.pt").write_bytes(b"w" * 10)
    uri = f"file://{remote}"
    downloads = []
    real_copy = pyarrow.fs.copy_files

    def slow_counted_copy(*args, **kwargs):  # the real copy, slowed so that the four callers overlap
        downloads.append(args[0])
        time.sleep(0.3)
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(pyarrow.fs, "copy_files", slow_counted_copy)
    with ThreadPoolExecutor(4) as pool:
        copies = set(pool.map(lambda _: storage.cached_copy(uri, tmp_path / "cache"), range(4)))
    assert len(copies) == 1 and downloads == [str(remote)]
    copy = copies.pop()
    assert (copy / "train_left.npy").read_bytes() == (remote / "train_left.npy").read_bytes()
    assert (copy / "stn" / "weights.pt").read_bytes() == b"w" * 10
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [copy.name, f"{copy.name}.lock"]  # no temp left
    assert storage.cached_copy(uri, tmp_path / "cache") == copy and len(downloads) == 1  # later asks: no download
    assert storage.cached_copy(remote) == remote  # a path (shared FS) is used in place
    with pytest.raises(FsweepError, match="no such directory"):
        storage.cached_copy(f"file://{tmp_path}/nothing", tmp_path / "cache")


def test_an_unreachable_address_is_one_line(monkeypatch):
    def refused(**kwargs):
        raise ConnectionError(f"Could not find any running Ray instance at {kwargs['address']}.\nMore help...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(FsweepError, match="address 10.9.9.9:6379: cannot join Ray") as error:
        connect("10.9.9.9:6379")
    assert "\n" not in str(error.value)


def test_a_failed_download_is_one_line_and_leaves_no_partial_copy(tmp_path, monkeypatch):
    import pyarrow.fs

    remote = tmp_path / "bucket" / "variant"
    remote.mkdir(parents=True)
    (remote / "train_left.npy").write_bytes(b"x")

    def broken_copy(source, destination, **kwargs):  # the connection drops after part of the files arrived
        (Path(destination) / "train_left.npy").write_bytes(b"half")
        raise OSError("connection reset by peer")

    monkeypatch.setattr(pyarrow.fs, "copy_files", broken_copy)
    with pytest.raises(FsweepError, match="failed: connection reset by peer"):
        storage.cached_copy(f"file://{remote}", tmp_path / "cache")
    assert all(p.name.endswith(".lock") for p in (tmp_path / "cache").iterdir())  # no half copy, no temp dir


# --- cluster files -----------------------------------------------------------------------

def test_cluster_launcher_config_validates_and_opens_no_port_to_the_world():
    text = (PROJECT_ROOT / "cluster" / "ray-cluster.yaml").read_text()
    config = validate_launcher_config(yaml.safe_load(text))  # Ray's own schema check, as `ray up` runs it
    assert "0.0.0.0" not in yaml.safe_dump(config) and config["provider"]["use_internal_ips"] is True
    node_types = config["available_node_types"]
    # With SecurityGroupIds on every node type Ray creates no group of its own (its default opens SSH to all).
    assert all(t["node_config"].get("SecurityGroupIds") for t in node_types.values())
    worker = node_types["gpu_worker"]
    assert worker["min_workers"] == 0 < worker["max_workers"] and worker["node_config"]["InstanceType"].startswith("g")
    assert node_types["head"]["resources"] == {"CPU": 0}
    setup = "\n".join(config["setup_commands"])
    assert "/shared" in setup and "pip install" in setup and "fsweep" in setup
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])


def test_kuberay_manifest_has_a_gpu_group_a_shared_volume_and_no_outside_exposure():
    docs = list(yaml.safe_load_all((PROJECT_ROOT / "cluster" / "kuberay.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert not {"Service", "Ingress"} & set(kinds)  # KubeRay's own head Service only, ClusterIP
    cluster_spec = kinds["RayCluster"]["spec"]
    assert kinds["RayCluster"]["apiVersion"] == "ray.io/v1" and cluster_spec["authOptions"]["mode"] == "token"
    head = cluster_spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    claim = kinds["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    groups = [head, *cluster_spec["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounted = [m["name"] for c in pod["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/shared"]
        assert mounted and volumes[mounted[0]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    gpu = [g for g in cluster_spec["workerGroupSpecs"]
           if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu and gpu[0]["minReplicas"] == 0 < gpu[0]["maxReplicas"]


# --- the pipeline on the cluster ----------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(ray_cluster, dicom_inputs, tmp_path_factory):
    """ingest -> store build -> sweep -> report -> export -> predict through the CLI on the cluster."""
    out = tmp_path_factory.mktemp("outputs")
    dataset, store, runs = out / "dataset", out / "store", out / "runs"
    logs = fsweep("ingest", str(dicom_inputs / "manifest.csv"), "--out", str(dataset), "--seed", "0")
    logs += fsweep("store", "build", str(dataset), "--store", str(store), "--size", "32", "--he", "off,global",
                   "--address", ray_cluster.address)
    cfg = tiny_sweep_config(dataset, store, backbone=["resnet10t", "no_such_net"], seed=[0, 1])
    cfg.search.max_failures = 0  # a bad backbone fails the same way every time
    config = out / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    storage_uri = f"file://{runs}"  # through pyarrow's URI file systems, exactly as s3:// or gs:// storage goes
    logs += fsweep("sweep", str(config), "--address", ray_cluster.address, "--name", "pipe", "--storage", storage_uri)
    logs += fsweep("report", f"{storage_uri}/pipe")
    logs += fsweep("export", f"{storage_uri}/pipe", "--out", str(out / "model"))
    scans = [str(dicom_inputs / "scans" / f"img_{n:03d}.dcm") for n in range(2)]
    logs += fsweep("predict", str(out / "model"), *scans, "--out", str(out / "preds.csv"), "--view", "right")
    return dict(out=out, dataset=dataset, store=store, experiment=runs / "pipe", logs=logs)


@pytest.mark.slow
def test_store_is_built_by_tasks_on_several_nodes_and_read_by_trials_on_several_nodes(pipeline, ray_cluster):
    node_ids = [n.node_id for n in [ray_cluster.head_node, *ray_cluster.worker_nodes]]
    images = len(pd.read_parquet(pipeline["dataset"] / "dataset.parquet"))
    builds = [json.loads(p.read_text())["built_on"] for p in pipeline["store"].glob("*/build.json")]
    assert len(builds) == 2  # off and global, built in one pass
    for built_on in builds:
        assert len(built_on) >= 2 and set(built_on) <= set(node_ids), built_on
        assert sum(built_on.values()) == images  # every image once, wherever it ran
    board = pd.read_csv(pipeline["experiment"] / "leaderboard.csv")
    done = board[board["status"] == "TERMINATED"]
    assert len(done) == 2 and done["val_auc"].between(0, 1).all()
    ran_on = {label.rsplit("/", 1)[-1] for label in done["node"]}
    assert len(ran_on) == 2, board[["trial_id", "node"]]  # the two good trials ran (and read the store) apart
    assert all(any(n.startswith(prefix) for n in node_ids) for prefix in ran_on)


@pytest.mark.slow
def test_a_trial_that_raises_on_a_node_is_recorded_with_its_reason(pipeline):
    board = pd.read_csv(pipeline["experiment"] / "leaderboard.csv")
    failed = board[board["status"] == "ERROR"]
    assert list(failed["backbone"]) == ["no_such_net", "no_such_net"]
    assert failed["error"].str.contains("no_such_net").all()
    assert (board["status"] == "TERMINATED").sum() == 2  # the sweep went on


def files_under(root: Path) -> list[Path]:
    """Every regular file below ``root`` (sockets and links left out)."""
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.slow
def test_no_patient_identifier_leaves_the_input_files(pipeline, ray_cluster, dicom_inputs):
    # The inputs do hold them (so the search below can find what it looks for).
    assert all(needle in (dicom_inputs / "scans" / "img_000.dcm").read_bytes().lower() for needle in NEEDLES)
    session = Path(ray_cluster.head_node.get_session_dir_path())  # Ray's logs and the trials' working dirs
    written = files_under(pipeline["out"]) + files_under(session)
    kinds = {p.suffix for p in written}
    assert {".parquet", ".npy", ".csv", ".json", ".pt", ".md", ".onnx", ".safetensors", ".log"} <= kinds, kinds
    assert any(p.name.startswith("events.out.tfevents") for p in written)  # TensorBoard event files
    leaks = []
    for path in written:
        text = path.read_bytes().lower()
        leaks += [f"{path}: {needle.decode()}" for needle in NEEDLES if needle in text or needle in str(path).lower().encode()]
    leaks += [f"logs: {needle.decode()}" for needle in NEEDLES if needle in pipeline["logs"].lower().encode()]
    assert not leaks, "\n".join(leaks)


# --- losing a node ----------------------------------------------------------------------

@pytest.mark.slow
def test_store_build_that_loses_a_node_finishes_with_a_verified_store(pipeline, ray_cluster):
    spec = make_spec(he="clahe", size=48, aspect="pad")
    with TaskNodeKiller(ray_cluster, CHUNK_TASK) as killer:
        variant = build_variant(pipeline["dataset"], pipeline["store"], spec)
    try:
        assert killer.removed is not None, "no store task was seen on a worker node"  # killed while it ran one
        variant = open_variant(pipeline["store"], variant_key(pipeline["dataset"], spec), full=True)  # every checksum
        rows = pd.read_parquet(pipeline["dataset"] / "dataset.parquet").set_index("image_id")
        assert len(variant.index) == len(rows)
        built_on = json.loads((variant.path / "build.json").read_text())["built_on"]
        assert sum(built_on.values()) == len(rows)  # each image counted once: lost chunks ran again elsewhere
        for split in ("train", "val", "test"):
            for view in ("left", "right"):
                images = variant.images(split, view)
                for image_id, stored in zip(variant.image_ids(split, view), images):
                    assert np.array_equal(stored, preprocess_image(rows.loc[image_id, "image"], spec)), image_id
    finally:
        replace_removed_node(ray_cluster, killer)


def trial_histories(experiment: Path) -> dict[str, list[dict]]:
    """trial dir name -> every result row Tune recorded for it (one per reported epoch)."""
    out = {}
    for path in experiment.glob("trial_*/result.json"):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        out[path.parent.name] = [json.loads(line) for line in lines]
    return out


class TrialNodeKiller(threading.Thread):
    """Removes the worker node of the first trial that reported an epoch there and still has epochs to run."""

    def __init__(self, cluster: Cluster, experiment: Path, epochs: int):
        super().__init__(daemon=True)
        self.cluster, self.experiment, self.epochs = cluster, experiment, epochs
        self.removed, self.victim = None, None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and self.removed is None:
            for trial, history in trial_histories(self.experiment).items():
                last = history[-1] if history else {}
                for node in list(self.cluster.worker_nodes):
                    if last.get("epoch", self.epochs) < self.epochs and last.get("node", "").endswith(node.node_id[:8]):
                        self.cluster.remove_node(node, allow_graceful=False)
                        self.removed, self.victim = node, trial
                        return
            time.sleep(0.05)

    def __enter__(self) -> TrialNodeKiller:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()


@pytest.mark.slow
def test_sweep_that_loses_a_worker_node_resumes_its_trials_elsewhere_without_repeating_epochs(pipeline, ray_cluster):
    from search.sweep import run_sweep

    epochs = 4
    cfg = tiny_sweep_config(pipeline["dataset"], pipeline["store"], backbone="resnet10t", epochs=epochs,
                            seed=[0, 1, 2])
    cfg.search.max_failures = 2
    cfg.train.checkpoint_every = 1  # every epoch checkpointed: a restarted trial repeats none
    experiment = pipeline["out"] / "runs" / "node_loss"
    with TrialNodeKiller(ray_cluster, experiment, epochs) as killer:
        run_sweep(cfg, address=ray_cluster.address, name="node_loss", storage=str(experiment.parent))
    try:
        assert killer.removed is not None, "no trial was caught running on a worker node"
        board = pd.read_csv(experiment / "leaderboard.csv")
        assert len(board) == 3 and (board["status"] == "TERMINATED").all(), board
        histories = trial_histories(experiment)
        assert len(histories) == 3
        for trial, history in histories.items():
            assert [row["epoch"] for row in history] == list(range(1, epochs + 1)), trial  # none twice, none lost
        nodes = [row["node"].rsplit("/", 1)[-1] for row in histories[killer.victim]]
        assert killer.removed.node_id[:8] in nodes[:-1] and nodes[-1] != nodes[0]  # started there, finished elsewhere
    finally:
        replace_removed_node(ray_cluster, killer)


# --- concurrency that follows the cluster -------------------------------------------------

def trial_spans(experiment: Path) -> list[tuple[float, float]]:
    """(start, end) wall times of every trial, from the results Tune recorded (first report minus its epoch time)."""
    spans = []
    for history in trial_histories(experiment).values():
        if history:
            first, last = history[0], history[-1]
            spans.append((first["timestamp"] - first["time_this_iter_s"], last["timestamp"]))
    return spans


def overlapping(spans: list[tuple[float, float]]) -> bool:
    """True when some two spans share a moment."""
    spans = sorted(spans)
    return any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


def test_concurrency_needs_no_cluster_size_grid_and_random_unlimited_optuna_fixed():
    from fsmodels.config import Config
    from search import space

    cfg = Config()
    for algorithm, limit in (("grid", 0), ("random", 0), ("optuna", space.OPTUNA_CONCURRENCY)):
        cfg.search.algorithm = algorithm
        assert space.concurrency(cfg) == limit  # 0: Ray queues every pending trial; the autoscaler sees them
    cfg.search.max_concurrent = 3
    assert space.concurrency(cfg) == 3
    assert space.search_algorithm(cfg).max_concurrent == 3


@pytest.mark.slow
def test_a_sweep_on_a_zero_cpu_head_runs_trials_side_by_side_on_workers_that_join_later(tiny_dataset, tmp_path):
    from preprocessing.store import build_variant

    store, runs = tmp_path / "store", tmp_path / "runs"
    build_variant(tiny_dataset, store, make_spec(he="global", size=32))  # whatever Ray this process has, or a local one
    cfg = tiny_sweep_config(tiny_dataset, store, seed=[0, 1, 2, 3], epochs=3)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    late = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # as both shipped cluster files start
    try:
        driver = subprocess.Popen(
            [sys.executable, "-m", "fsweep.cli", "sweep", str(config), "--address", late.address, "--name", "late",
             "--storage", str(runs)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while not (runs / "late" / "fsweep_sweep.yaml").is_file() and driver.poll() is None:
            assert time.monotonic() < deadline, "the sweep did not start"
            time.sleep(0.2)
        time.sleep(2)  # the sweep runs (every trial pending: the head has no CPU) before any worker exists
        for _ in range(2):
            late.add_node(num_cpus=1)
        logs, _ = driver.communicate(timeout=400)
        assert driver.returncode == 0, logs[-3000:]
        assert "ray: 1 nodes, 0 CPUs" in logs  # the cluster the driver saw at its start
    finally:
        late.shutdown()
    board = pd.read_csv(runs / "late" / "leaderboard.csv")
    assert len(board) == 4 and (board["status"] == "TERMINATED").all(), board
    assert board["node"].nunique() == 2  # both late workers ran trials ...
    assert overlapping(trial_spans(runs / "late"))  # ... at the same time


# --- one handle per artifact ---------------------------------------------------------------

@pytest.mark.slow
def test_export_after_a_reingest_uses_the_recorded_variant_or_refuses_in_one_line(ray_cluster, tiny_phantom, tmp_path):
    from fsweep.export import export_experiment
    from preprocessing.ingest import ingest
    from preprocessing.store import build_store
    from search.sweep import STORE_VARIANTS, run_sweep

    from conftest import TINY_SALT

    dataset, store = tmp_path / "dataset", tmp_path / "store"
    ingest(tiny_phantom / "manifest.csv", dataset, seed=0, salt=TINY_SALT, echo=False)
    fingerprint = json.loads((dataset / "summary.json").read_text())["fingerprint"]
    build_store(dataset, store, roi="none", size=64, recipes=[("global", "stretch")], margin=0.05)
    cfg = tiny_sweep_config(dataset, store, seed=[0, 1], stn="frozen")
    cfg.data.size = 64  # a multiple of 64: the legacy ONNX exporter (export's fallback) pools the STN only there
    experiment = run_sweep(cfg, address=ray_cluster.address, name="rekey", storage=str(tmp_path / "runs"))
    record = yaml.safe_load((experiment / STORE_VARIANTS).read_text())
    recorded = record["variants"]["global/stretch"]["key"]
    stns = record["stns"]["global/stretch"]
    assert set(stns) == {0, 1} and stns[0]["key"] != stns[1]["key"]  # each seed pretrains its own STN
    stats = json.loads((store / "stn" / stns[1]["key"] / "stn.json").read_text())
    assert stats["seed"] == 1 and {"rotation_deg", "scale", "det"} <= set(stats["theta"])
    board = pd.read_csv(experiment / "leaderboard.csv").set_index("trial_id")

    # the same folder re-ingested with another split, the store rebuilt: another variant key
    ingest(tiny_phantom / "manifest.csv", dataset, seed=1, salt=TINY_SALT, echo=False)
    assert json.loads((dataset / "summary.json").read_text())["fingerprint"] != fingerprint
    rebuilt = build_store(dataset, store, roi="none", size=64, recipes=[("global", "stretch")], margin=0.05)
    assert rebuilt[0].key != recorded

    card = json.loads((export_experiment(experiment, tmp_path / "model") / "model_card.json").read_text())
    model = card["models"]["right"]
    assert model["store_variant"] == recorded and card["data"]["fingerprint"] == fingerprint  # what it trained on
    assert model["metrics"]["val"]["auc"] == pytest.approx(board.loc[model["trial_id"], "val_auc"], abs=1e-6)

    shutil.rmtree(store / recorded)  # the recorded variant is gone: a one-line refusal, never the new split
    with pytest.raises(FsweepError, match=f"{recorded}: variant not built") as error:
        export_experiment(experiment, tmp_path / "model2")
    assert "\n" not in str(error.value)


# --- patient data ------------------------------------------------------------------------

def test_the_salt_can_live_outside_the_dataset_folder(tiny_phantom, tmp_path, monkeypatch):
    from fsweep.cli import main as fsweep_main
    from preprocessing.ingest import hash_patient

    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    salt_file = secrets_dir / "salt"
    monkeypatch.setenv("FSWEEP_SALT_FILE", str(salt_file))
    assert fsweep_main(["ingest", str(tiny_phantom / "manifest.csv"), "--out", str(tmp_path / "dataset")]) == 0
    assert not (tmp_path / "dataset" / ".salt").exists()  # nothing next to the hashes to brute-force them with
    assert salt_file.stat().st_mode & 0o777 == 0o600
    salt = salt_file.read_text().strip()
    rows = pd.read_parquet(tmp_path / "dataset" / "dataset.parquet")
    manifest = pd.read_csv(tiny_phantom / "manifest.csv").set_index("image")
    first = rows.iloc[0]
    patient_id = manifest.loc[Path(first["image"]).relative_to(tiny_phantom).as_posix(), "patient_id"]
    assert first["patient"] == hash_patient(str(patient_id), salt)
    monkeypatch.delenv("FSWEEP_SALT_FILE")  # the flag does the same, and a re-ingest keeps the ids
    assert fsweep_main(["ingest", str(tiny_phantom / "manifest.csv"), "--out", str(tmp_path / "again"),
                        "--salt-file", str(salt_file)]) == 0
    assert list(pd.read_parquet(tmp_path / "again" / "dataset.parquet")["patient"]) == list(rows["patient"])
    assert fsweep_main(["ingest", str(tiny_phantom / "manifest.csv"), "--out", str(tmp_path / "x"),
                        "--salt-file", str(tmp_path / "nowhere" / "salt")]) != 0


# --- dependencies ------------------------------------------------------------------------

def imported_top_modules(paths: list[Path]) -> set[str]:
    """Top-level names of every module imported (module level or inside functions) by the files under ``paths``."""
    import ast

    names = set()
    for root in paths:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names


def test_every_imported_third_party_package_is_declared_with_an_installed_floor():
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    runtime = {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in project["dependencies"]}
    dev = {Requirement(r).name.lower(): Requirement(r) for r in project["optional-dependencies"]["dev"]}
    owners = metadata.packages_distributions()
    ours = {"fsweep", "search", "fsmodels", "preprocessing", "cluster", "conftest", "bench"}
    ours |= {path.stem for path in (PROJECT_ROOT / "bench").glob("*.py")}  # tests import benches from bench/
    ours |= {path.stem for path in (PROJECT_ROOT / "tests").glob("*.py")}  # and their own helper scripts

    def undeclared(modules: set[str], declared: dict) -> set[str]:
        missing = set()
        for module in modules - ours - set(sys.stdlib_module_names):
            dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
            if not dists & set(declared):
                missing.add(f"{module} ({', '.join(sorted(dists))})")
        return missing

    code = [PROJECT_ROOT / name for name in ("fsweep", "search", "fsmodels", "preprocessing", "cluster", "bench")]
    assert not undeclared(imported_top_modules(code), runtime)
    tools = {"packaging": None}  # pytest's own dependency
    assert not undeclared(imported_top_modules([PROJECT_ROOT / "tests"]), {**runtime, **dev, **tools})
    for name, requirement in {**runtime, **dev}.items():  # each floor is met by what the tests run on
        assert requirement.specifier.contains(metadata.version(name), prereleases=True), (name, metadata.version(name))
