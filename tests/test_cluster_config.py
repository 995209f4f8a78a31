"""Static checks of cluster/: the AWS launcher YAML and the KubeRay manifests."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAYJOBS = {"train": "rayjob-train.yaml", "encode": "rayjob-encode.yaml",
           "index": "rayjob-index.yaml", "evaluate": "rayjob-evaluate.yaml"}
GPU_JOBS = {"train", "encode", "evaluate"}


def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one YAML document"
    return docs[0]


def _pkg_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


FAISS_BUILDS = {"faiss-cpu", "faiss-gpu-cu12"}  # both install the module `faiss`


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _extra(name: str) -> list[str]:
    """The requirements of a pyproject extra, without environment markers."""
    return [r.split(";")[0].strip() for r in _project()["optional-dependencies"][name]]


# --------------------------------------------------------------------------- AWS launcher


@pytest.fixture(scope="module")
def aws() -> dict:
    return _load(CLUSTER / "aws.yaml")


def test_aws_yaml_validates_against_ray_schema(aws):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(aws, schema)  # raises ValidationError with the offending path


def test_aws_yaml_passes_ray_prepare_config(aws):
    """What `ray up` does before touching AWS: merge defaults, then validate again."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_aws_yaml_cpu_head_and_autoscaling_gpu_groups(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {k: v for k, v in types.items() if k != aws["head_node_type"]}
    gpu_counts = sorted(v["resources"].get("GPU", 0) for v in workers.values())
    assert 1 in gpu_counts and 8 in gpu_counts, "one single-GPU and one 8-GPU group"
    for name, node in workers.items():
        assert node["min_workers"] == 0, f"{name} must scale from zero"
        assert node["max_workers"] >= 1
    assert aws["max_workers"] >= max(v["max_workers"] for v in workers.values())


def test_aws_yaml_installs_the_project(aws):
    assert any(v == "." for v in aws["file_mounts"].values()), "the checkout is synced"
    commands = aws["setup_commands"] + [
        c for v in aws["available_node_types"].values() for c in v.get("worker_setup_commands", [])]
    assert any("pip install" in c and "-e ." in c for c in aws["setup_commands"])
    assert commands
    for excluded in (".venv", ".git", ".retriever"):
        assert excluded in aws["rsync_exclude"]


def test_aws_yaml_installs_one_faiss_build_per_node_type(aws):
    """`cpu` on the head and CPU workers, `gpu` on GPU workers, never both on one node:
    setup_commands run on every node, so they install neither."""
    def flavours(commands):
        return {f for c in commands if "pip install" in c for f in ("cpu", "gpu")
                if f"[{f}]" in c or f",{f}]" in c}

    assert flavours(aws["setup_commands"]) == set(), "setup_commands run on GPU nodes too"
    assert flavours(aws["head_setup_commands"]) == {"cpu"}
    for name, node in aws["available_node_types"].items():
        if name == aws["head_node_type"]:
            continue
        want = "gpu" if node["resources"].get("GPU") else "cpu"
        # node-type worker_setup_commands replace the global ones
        assert flavours(node.get("worker_setup_commands", aws["worker_setup_commands"])) == \
            {want}, name


# --------------------------------------------------------------------------- KubeRay


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    out = {name: _load(KUBERAY / fname) for name, fname in RAYJOBS.items()}
    out["search"] = _load(KUBERAY / "rayservice-search.yaml")
    return out


def _check_cluster_spec(spec: dict, where: str, *, want_gpu: bool, scale_from_zero: bool):
    assert spec.get("enableInTreeAutoscaling") is True, where
    assert re.fullmatch(r"\d+\.\d+\.\d+", str(spec["rayVersion"])), where
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and head_containers[0]["image"], where
    assert "nvidia.com/gpu" not in head_containers[0]["resources"].get("limits", {}), where
    groups = spec["workerGroupSpecs"]
    assert groups, where
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName"
    gpu_limits = []
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (where, g["groupName"])
        assert g["maxReplicas"] >= 1
        if scale_from_zero:
            assert g["minReplicas"] == 0, (where, g["groupName"])
        assert isinstance(g["rayStartParams"], dict)
        containers = g["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)
        res = containers[0]["resources"]
        gpus = res.get("limits", {}).get("nvidia.com/gpu")
        if gpus is not None:
            assert int(gpus) >= 1
            assert res["requests"].get("nvidia.com/gpu") == gpus, "GPU requests = limits"
            assert "-gpu" in containers[0]["image"] or "cu" in containers[0]["image"]
            gpu_limits.append(int(gpus))
    if want_gpu:
        assert gpu_limits, f"{where}: no worker group with nvidia.com/gpu limits"
    return gpu_limits


@pytest.mark.parametrize("job", sorted(RAYJOBS))
def test_rayjob_structure(manifests, job):
    doc = manifests[job]
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayJob"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["entrypoint"].split()[:3] == ["python", "-m", f"jobs.{job}"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"] and env["pip"]["packages"]
    assert env["env_vars"]["RETRIEVER_STORE"].startswith("s3://")
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"], job, want_gpu=job in GPU_JOBS,
                        scale_from_zero=True)


def _ray_containers(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g)
                                                 for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]["containers"][0]) for name, g in groups]


@pytest.mark.parametrize("job", sorted(RAYJOBS) + ["search"])
def test_kuberay_groups_install_their_own_faiss_build(manifests, job):
    """Each pod's `command` (run by KubeRay before `ray start`) installs exactly pyproject's
    `gpu` extra on GPU pods and its `cpu` extra elsewhere; the shared pip list has no FAISS."""
    for name, container in _ray_containers(manifests[job]):
        gpu = "nvidia.com/gpu" in container["resources"].get("limits", {})
        command = " ".join(container.get("command", []))
        assert "ray start" not in command, "KubeRay appends its own ray start"
        installed = sorted(re.findall(r'"([^"]+)"', command))
        assert "pip install" in command and installed == sorted(_extra("gpu" if gpu else "cpu")), \
            (job, name, command)


def _env_entries(doc: dict) -> list[tuple[str, dict]]:
    """Every ``env`` entry of every container of the manifest's Ray pods."""
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [(container["name"], entry) for g in groups
            for container in g["template"]["spec"]["containers"]
            for entry in container.get("env", [])]


@pytest.mark.parametrize("job", sorted(RAYJOBS) + ["search"])
def test_every_kuberay_cluster_turns_ray_token_auth_on(manifests, job):
    """Dashboard and Job API are reachable in the pod network: KubeRay's authOptions makes
    them (and Ray's gRPC services) want the token from a Secret; nothing switches it off."""
    doc = manifests[job]
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    auth = spec.get("authOptions") or {}
    assert auth.get("mode") == "token", (job, auth)
    assert auth.get("secretName"), f"{job}: the token's Secret must be named (cluster/README.md)"
    for name, entry in _env_entries(doc):
        assert entry["name"] not in {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, \
            f"{job}/{name}: {entry['name']} is KubeRay's to set from authOptions"


def _literal_credentials(value, path: str = "") -> list[str]:
    """Paths of ``{name: <credential>, value: ...}`` env entries anywhere in ``value``."""
    from retriever.ops.credentials import is_credential

    found = []
    if isinstance(value, dict):
        if is_credential(str(value.get("name", ""))) and "value" in value:
            found.append(f"{path}/{value['name']}")
        for key, item in value.items():
            if isinstance(key, str) and is_credential(key):
                found.append(f"{path}/{key}")
            found += _literal_credentials(item, f"{path}/{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _literal_credentials(item, f"{path}[{i}]")
    return found


@pytest.mark.parametrize("job", sorted(RAYJOBS) + ["search"])
def test_kuberay_manifests_hold_no_literal_credential(manifests, job):
    """Tokens and keys come from Secrets (secretKeyRef), never a value in the manifest; the
    runtime envs (shown by the dashboard) carry none at all."""
    doc = manifests[job]
    found = _literal_credentials(doc)
    spec = doc["spec"]
    if "runtimeEnvYAML" in spec:
        found += _literal_credentials(yaml.safe_load(spec["runtimeEnvYAML"]), "runtimeEnvYAML")
    if "serveConfigV2" in spec:
        found += _literal_credentials(yaml.safe_load(spec["serveConfigV2"]), "serveConfigV2")
    assert not found, (job, found)


def test_search_api_token_comes_from_a_secret(manifests):
    """Every pod of the search RayService (replicas may land on any) gets the API's bearer
    token from the Secret llm-retriever-api-token, by secretKeyRef."""
    from serve.api import TOKEN_ENV

    doc = manifests["search"]
    containers = [c for _, c in _ray_containers(doc)]
    for container in containers:
        entries = [e for e in container.get("env", []) if e["name"] == TOKEN_ENV]
        assert len(entries) == 1, (container["name"], "no " + TOKEN_ENV)
        ref = entries[0].get("valueFrom", {}).get("secretKeyRef", {})
        assert "value" not in entries[0] and ref.get("name") and ref.get("key"), entries[0]


@pytest.mark.parametrize("job", sorted(RAYJOBS))
def test_rayjob_entrypoint_parses_with_the_jobs_own_options(manifests, job):
    import dataclasses
    import importlib
    import shlex

    from retriever.config import build_parser

    configs = {"train": ("retriever.training.config", "TrainConfig"),
               "encode": ("jobs.encode", "EncodeConfig"), "index": ("jobs.index", "IndexConfig"),
               "evaluate": ("jobs.evaluate", "MatrixConfig")}
    module, name = configs[job]
    cls = getattr(importlib.import_module(module), name)
    argv = shlex.split(manifests[job]["spec"]["entrypoint"])[3:]
    parsed = vars(build_parser(cls, job).parse_args(argv))  # exits on an unknown flag
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    assert parsed.get("config") or all(r in parsed for r in required), (job, required)


def test_train_uses_8_gpu_nodes_and_encode_single_gpu(manifests):
    train = _check_cluster_spec(manifests["train"]["spec"]["rayClusterSpec"], "train",
                                want_gpu=True, scale_from_zero=True)
    encode = _check_cluster_spec(manifests["encode"]["spec"]["rayClusterSpec"], "encode",
                                 want_gpu=True, scale_from_zero=True)
    assert 8 in train and 1 in encode


def test_rayservice_structure(manifests):
    doc = manifests["search"]
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayService"
    spec = doc["spec"]
    serve = yaml.safe_load(spec["serveConfigV2"])
    apps = serve["applications"]
    assert [a["import_path"] for a in apps] == ["serve.app:build_app"]
    app = apps[0]
    assert app["runtime_env"]["working_dir"] and app["runtime_env"]["pip"]["packages"]
    scaled = [d for d in app.get("deployments", []) if "autoscaling_config" in d]
    assert scaled, "at least one deployment autoscales"
    for d in scaled:
        cfg = d["autoscaling_config"]
        assert 1 <= cfg["min_replicas"] <= cfg["max_replicas"]
    in_code = app["args"].get("deployments", [])  # merged with the code's options
    gpu_deployments = [d["name"] for d in in_code + app["deployments"]
                       if d.get("ray_actor_options", {}).get("num_gpus", 0) > 0]
    assert gpu_deployments == ["QueryEncoder"], "the query encoder asks for a GPU"
    # Serve's list may only name deployments the app has: one ShardSearcher-i per shard
    names = [d["name"] for d in app["deployments"]]
    shards = sorted(int(n.rsplit("-", 1)[1]) for n in names if n.startswith("ShardSearcher-"))
    assert set(names) - {f"ShardSearcher-{i}" for i in shards} <= {"QueryEncoder", "Router"}
    assert shards == list(range(len(shards))) and shards, names
    assert "ShardSearcher" not in names  # no such deployment: the generic name is args-only
    _check_cluster_spec(spec["rayClusterConfig"], "search", want_gpu=True, scale_from_zero=False)
    head_ports = {p["containerPort"]
                  for p in spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
                  ["containers"][0]["ports"]}
    assert {8265, 8000} <= head_ports


def test_serve_app_builder_named_in_the_manifest_exists_when_written():
    app = ROOT / "serve" / "app.py"
    if not app.exists():
        pytest.skip("serve/app.py not written yet")
    assert "def build_app" in app.read_text()


# --------------------------------------------------------------------------- consistency


def test_runtime_env_pip_matches_kuberay_and_pyproject(manifests):
    base = _load(CLUSTER / "runtime_env.yaml")
    packages = base["pip"]["packages"]
    for name, doc in manifests.items():
        if doc["kind"] == "RayJob":
            env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        else:
            env = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["runtime_env"]
        assert env["pip"]["packages"] == packages, f"{name}: pip list differs from runtime_env.yaml"
        for key, value in base["env_vars"].items():
            assert env["env_vars"][key] == value, name
    declared = {_pkg_name(d) for d in _project()["dependencies"]}
    for req in packages:
        assert _pkg_name(req) in declared, f"{req} is not a project dependency"
    assert "ray" not in {_pkg_name(r) for r in packages}, "a job must not reinstall Ray"
    assert not FAISS_BUILDS & {_pkg_name(r) for r in packages}, \
        "FAISS is per node group: a job-wide pip list would put faiss-cpu on GPU nodes"


def test_faiss_builds_are_exclusive_extras():
    """`pip install -e .[gpu]` must not install faiss-cpu: base has no FAISS, and the
    `cpu` and `gpu` extras hold one build each."""
    project = _project()
    assert not FAISS_BUILDS & {_pkg_name(d) for d in project["dependencies"]}
    cpu, gpu = ({_pkg_name(r) for r in _extra(e)} for e in ("cpu", "gpu"))
    assert cpu & FAISS_BUILDS == {"faiss-cpu"} and gpu & FAISS_BUILDS == {"faiss-gpu-cu12"}
    assert "nvidia-ml-py" in gpu, "GPU utilisation in the encode summary needs NVML"
    for name, requirements in project["optional-dependencies"].items():
        if name not in ("cpu", "gpu"):
            assert not FAISS_BUILDS & {_pkg_name(r) for r in requirements}, name


def test_setup_script_installs_one_faiss_extra():
    script = (ROOT / "scripts" / "setup.sh").read_text()
    assert 'pip install -e ".[models,test,$FLAVOUR]"' in script
    assert "FLAVOUR=gpu" in script and "FLAVOUR=cpu" in script


def test_ray_version_is_the_same_everywhere(aws, manifests):
    versions = set()
    for doc in manifests.values():
        spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
        versions.add(str(spec["rayVersion"]))
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for g in groups:
            for c in g["template"]["spec"]["containers"]:
                m = re.match(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)", c["image"])
                assert m, c["image"]
                versions.add(m.group(1))
    docker = aws["docker"]
    for image in [docker["image"], docker["head_image"]] + [
            v["docker"]["worker_image"] for v in aws["available_node_types"].values()
            if "docker" in v]:
        versions.add(re.match(r"rayproject/ray:(\d+\.\d+\.\d+)", image).group(1))
    assert len(versions) == 1, versions


def test_local_autoscaling_config_mirrors_the_launcher_groups(aws):
    """`retriever cluster up --local --autoscale`'s config: Ray's schema holds, the groups
    keep their names, limits and custom resources, GPUs become the fake_gpu resource, and
    the head takes no work."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import validate_config

    from retriever.ops import autoscale

    config = autoscale.local_config(aws, "127.0.0.1:6379", {"head": 1},
                                    autoscale.FakeNodeSizes(node_cpus=2, idle_timeout_minutes=0.5))
    validate_config(config)  # what Ray's monitor runs on it
    assert config["provider"]["type"] == "fake_multinode"
    assert config["idle_timeout_minutes"] == 0.5 and config["max_workers"] == aws["max_workers"]
    head = config["available_node_types"].pop(config["head_node_type"])
    assert head["resources"]["CPU"] == 0
    groups = {k: v for k, v in aws["available_node_types"].items() if k != aws["head_node_type"]}
    assert set(config["available_node_types"]) == set(groups)
    for name, group in groups.items():
        local = config["available_node_types"][name]
        assert (local["min_workers"], local["max_workers"]) == (group["min_workers"],
                                                                group["max_workers"])
        custom = {k: v for k, v in group["resources"].items() if k not in ("CPU", "GPU")}
        assert {k: local["resources"][k] for k in custom} == custom
        assert "GPU" not in local["resources"]
        assert local["resources"].get(autoscale.FAKE_GPU, 0) == group["resources"].get("GPU", 0)
