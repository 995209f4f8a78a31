"""The GPU paths' logic that a CPU can check: where the decision to use a GPU is taken, the
GPU k-means index kept alive while FAISS trains, the FAISS extras, the NVML-backed encode
summary and the transformers floor. The CUDA tier itself is tests/gpu/test_cuda.py."""

from __future__ import annotations

import gc
import re
import tomllib
import weakref
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from retriever.index import shards as sh
from retriever.modeling import device
from tests.index_fixtures import write_embeddings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_gpu_faiss(monkeypatch):
    """FAISS that reports one GPU and "copies" indexes to it by keeping them on the CPU; the
    returned list collects a weak reference to every index it hands out."""
    handed_out: list[weakref.ref] = []

    def to_all_gpus(index, *args, **kwargs):
        clone = faiss.clone_index(index)
        handed_out.append(weakref.ref(clone))
        return clone

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus, raising=False)
    return handed_out


# --------------------------------------------------------------------------- k-means on GPU

def test_gpu_clustering_index_stays_alive_while_training(fake_gpu_faiss):
    """``clustering_index`` is a bare SWIG pointer: the GPU index must be held by Python
    until training is over (assigning a temporary freed it at once: a dangling pointer)."""
    index = sh.new_index("IVF8,Flat", 16)
    ivf = faiss.extract_index_ivf(index)
    with sh.gpu_clustering(index, 16) as clustering:
        gc.collect()
        assert clustering is not None and fake_gpu_faiss[0]() is clustering
        assert ivf.clustering_index is not None
    assert ivf.clustering_index is None, "detached once training is done"
    del clustering
    gc.collect()
    assert fake_gpu_faiss[0]() is None, "and then released"


def test_train_with_gpu_clustering_equals_cpu_training(fake_gpu_faiss):
    vectors = np.random.default_rng(0).standard_normal((8 * 39 * 2, 16)).astype(np.float32)
    on_gpu = sh.train("IVF8,Flat", vectors, gpu=True)
    assert len(fake_gpu_faiss) == 1, "k-means assigned points through the GPU index"
    assert on_gpu == sh.train("IVF8,Flat", vectors, gpu=False)
    assert sh.train("Flat", vectors, gpu=True) == sh.train("Flat", vectors)  # nothing to train


def test_gpu_clustering_leaves_a_non_ivf_index_alone(fake_gpu_faiss):
    with sh.gpu_clustering(sh.new_index("HNSW8,Flat", 16), 16) as clustering:
        assert clustering is None
    assert not fake_gpu_faiss


# --------------------------------------------------------------------------- where GPUs are used

def test_ray_assignment_decides_inside_a_task(monkeypatch):
    """A Ray task that asked for no GPU uses none, whatever the node (or torch) shows."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(device, "ray_assigned_gpu_ids", lambda: [])
    assert device.usable_gpu_count() == 0
    monkeypatch.setattr(device, "ray_assigned_gpu_ids", lambda: ["3"])
    assert device.usable_gpu_count() == 1
    monkeypatch.setattr(device, "ray_assigned_gpu_ids", lambda: None)  # not in a Ray worker
    assert device.usable_gpu_count() == 4


def test_outside_ray_there_is_no_assignment():
    assert device.ray_assigned_gpu_ids() is None or __import__("ray").is_initialized()


def test_faiss_uses_a_gpu_only_where_the_task_may(monkeypatch, fake_gpu_faiss):
    monkeypatch.setattr(device, "ray_assigned_gpu_ids", lambda: [])
    assert sh.gpu_count() == 0 and sh.use_gpu("auto") is False
    with pytest.raises(Exception, match="gpu=yes"):
        sh.use_gpu("yes")
    monkeypatch.setattr(device, "ray_assigned_gpu_ids", lambda: ["0"])
    assert sh.gpu_count() == 1 and sh.use_gpu("auto") is True
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)  # a CPU build of FAISS
    assert sh.use_gpu("auto") is False


def test_gpus_to_request(monkeypatch):
    import ray

    assert device.gpus_to_request("yes") == 1 and device.gpus_to_request(True) == 1
    assert device.gpus_to_request("no") == 0 and device.gpus_to_request(False) == 0
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert device.gpus_to_request("auto") == 1, "a CPU driver still sends tasks to GPUs"
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    assert device.gpus_to_request("auto") == 0
    with pytest.raises(ValueError):
        device.gpus_to_request("maybe")


def test_shard_tasks_get_the_setting_and_decide_themselves(tmp_path, monkeypatch):
    """The driver hands the tasks the gpu *setting*; each shard resolves it where it runs."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((400, 8)).astype(np.float32)
    ids = [f"d{i}" for i in range(400)]
    folder = str(tmp_path / "emb")
    write_embeddings(folder, ids, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), {})
    seen, resolved = [], []
    real_use_gpu = sh.use_gpu

    def spy_use_gpu(setting="auto"):
        resolved.append(setting)
        return real_use_gpu(setting)

    def run_all(fn, n, shared):
        seen.append(shared["gpu"])
        return [fn(number=i, **shared) for i in range(n)]

    monkeypatch.setattr(sh, "use_gpu", spy_use_gpu)
    manifest = sh.build(folder, str(tmp_path / "index"), 2, sh.IndexSpec(type="flat"),
                        gpu="auto", run_all=run_all)
    assert seen == ["auto"], "the setting, not the driver's answer"
    assert resolved.count("auto") == 3, "the driver (its own training) and each shard task"
    assert manifest["gpu"] is False and all("gpu" not in s for s in manifest["shards"])


# --------------------------------------------------------------------------- packaging, summary

def _floor(requirement: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.search(r">=([\d.]+)", requirement).group(1).split("."))


def test_transformers_floor_admits_from_pretrained_dtype():
    """``from_pretrained(dtype=...)`` (used by the Encoder and the trainer) is 4.56+."""
    uses = [p for p in (ROOT / "retriever").rglob("*.py")
            if re.search(r"from_pretrained\([^)]*\bdtype=", p.read_text(), re.S)]
    assert uses, "the check is about these calls"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    transformers = next(d for d in deps if d.startswith("transformers"))
    assert _floor(transformers) >= (4, 56), transformers


def test_encode_summary_reports_gpu_utilisation_and_memory():
    from retriever.pipelines.encode import EncodeResult

    result = EncodeResult(folder="f", shards_encoded=1, shards_reused=0, docs=10, seconds=1.0,
                          tokens=100, padded_tokens=120, complete=False, shards_total=None,
                          rows_total=None, skipped={}, gpu_util=71.6, resources="1 GPU",
                          gpu_memory_gb=3.25)
    assert "GPU util 72%, GPU memory peak 3.2 GiB" in result.summary()
    result.gpu_util = result.gpu_memory_gb = None
    assert "GPU util n/a" in result.summary() and "memory" not in result.summary()


def test_index_tasks_ask_ray_for_gpus_the_cluster_has(monkeypatch):
    """``ray_runner`` on a CPU driver: with gpu=auto every shard task asks for a GPU when the
    cluster has any (before, the driver's own "no GPU here" decided for every task)."""
    import ray

    from retriever.index.build import ray_runner

    asked = []

    class Ref:
        def __init__(self, value):
            self.value = value

    def remote(**options):
        asked.append(options)
        return lambda fn: type("Task", (), {"remote": staticmethod(
            lambda **kw: Ref(fn(**{k: v.value if isinstance(v, Ref) else v
                                   for k, v in kw.items()})))})

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 8.0})
    monkeypatch.setattr(ray, "remote", remote)
    monkeypatch.setattr(ray, "put", Ref)
    monkeypatch.setattr(ray, "get", lambda ref: ref.value)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns: (refs[:1], refs[1:]))
    monkeypatch.setattr(device, "usable_gpu_count", lambda: 0)  # the driver has none
    run_all = ray_runner(workers=2, cpus=1.0, gpu="auto")
    assert run_all(lambda number, gpu: (number, gpu), 3, {"gpu": "auto"}) == [
        (0, "auto"), (1, "auto"), (2, "auto")]
    assert asked == [{"num_cpus": 1.0, "num_gpus": 1}]
    ray_runner(workers=2, cpus=1.0, gpu="no")(lambda number: number, 1, {})
    assert asked[-1]["num_gpus"] == 0


def test_a_real_ray_task_sees_its_own_assignment():
    """Inside a Ray task the assignment (none here) is what counts; in the driver there is
    none to read (None), so the driver falls back to what CUDA shows."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0.5, num_gpus=0)
        def inside():
            from retriever.modeling import device as task_device

            return task_device.ray_assigned_gpu_ids(), task_device.usable_gpu_count()

        assert ray.get(inside.remote()) == ([], 0)
        assert device.ray_assigned_gpu_ids() is None
    finally:
        ray.shutdown()
