"""The deployment files agree with each other and with the project.

ray-cluster.yaml is validated with Ray's own cluster-config schema (what `ray up` runs); the
Kubernetes manifests and the Dockerfile are parsed and checked field by field: one image
everywhere, tagged with the project version; the same ports; entrypoints that name real
`jobs/` modules and configs that load; the dashboard and MLflow never exposed publicly.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CLUSTER_YAML = ROOT / "ray-cluster.yaml"
DOCKERFILE = INFRA / "Dockerfile"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
MLFLOW = INFRA / "mlflow" / "mlflow.yaml"

PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "mlflow": 5000}


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[dict]:
    return [doc for path in sorted(INFRA.rglob("*.yaml")) for doc in load_all(path)]


def find_key(obj, key: str):
    """Every value stored under `key`, anywhere in a nested YAML document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from find_key(v, key)
    elif isinstance(obj, list):
        for item in obj:
            yield from find_key(item, key)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), re.MULTILINE))


def start_flags(command: str) -> dict[str, str]:
    """`--name=value` flags of a `ray start ...` shell line."""
    return dict(re.findall(r"--([\w-]+)=(\S+)", command))


def ray_cluster_spec() -> dict:
    (doc,) = load_all(RAYCLUSTER)
    assert doc["kind"] == "RayCluster"
    return doc["spec"]


def ray_job() -> dict:
    (doc,) = load_all(RAYJOB)
    assert doc["kind"] == "RayJob"
    return doc


def mlflow_docs() -> tuple[dict, dict]:
    docs = {d["kind"]: d for d in load_all(MLFLOW)}
    return docs["Deployment"], docs["Service"]


# --------------------------------------------------------------------------------------
# ray-cluster.yaml
# --------------------------------------------------------------------------------------


def _validate_with_ray(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(config))  # what `ray up` does before validating
    validate_config(full)
    return full


def test_cluster_yaml_passes_rays_schema():
    full = _validate_with_ray(cluster_config())
    assert full["provider"]["type"] == "aws"
    assert full["head_node_type"] in full["available_node_types"]


def test_ray_schema_check_rejects_a_broken_config():
    """The validation above is not vacuous: a misspelled key and a wrong type both fail."""
    import jsonschema

    bad = cluster_config()
    bad["available_node_types"]["gpu_1x"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError):
        _validate_with_ray(bad)
    bad = cluster_config()
    bad["idle_timeout_minutes"] = "ten"
    with pytest.raises(jsonschema.ValidationError):
        _validate_with_ray(bad)


def test_cluster_yaml_provider_and_autoscaling_bounds():
    cfg = cluster_config()
    provider = cfg["provider"]
    assert provider["region"] and provider["availability_zone"].startswith(provider["region"])
    assert "cache_stopped_nodes" in provider
    assert cfg["auth"]["ssh_user"]
    assert cfg["idle_timeout_minutes"] > 0
    workers = {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}
    assert len(workers) >= 2, "a single-GPU and a multi-GPU worker type"
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= cfg["max_workers"], name


def test_spot_only_on_workers():
    cfg = cluster_config()
    head = cfg["head_node_type"]
    for name, node_type in cfg["available_node_types"].items():
        market = node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType")
        if name == head:
            assert market is None, "the head must be on-demand: losing it loses every job"
        else:
            assert market == "spot", name


def test_gpu_worker_types_have_one_and_several_gpus():
    """Instance types are real GPU types with a single- and a multi-GPU choice (Ray detects the
    GPU count from the type at launch; the table is AWS's published counts)."""
    gpus_per_type = {"g5.xlarge": 1, "g5.2xlarge": 1, "g6.xlarge": 1, "g6e.xlarge": 1,
                     "g6e.2xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8, "g6e.12xlarge": 4,
                     "g6.12xlarge": 4, "p4d.24xlarge": 8, "p5.48xlarge": 8}
    cfg = cluster_config()
    counts = [
        gpus_per_type.get(t["node_config"]["InstanceType"])
        for n, t in cfg["available_node_types"].items()
        if n != cfg["head_node_type"]
    ]
    assert None not in counts, f"unknown GPU instance type among {counts}"
    assert 1 in counts and max(counts) > 1


def test_dashboard_bound_to_loopback_and_ports():
    cfg = cluster_config()
    head_cmd = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    flags = start_flags(head_cmd)
    assert flags["dashboard-host"] == "127.0.0.1"
    assert int(flags["dashboard-port"]) == PORTS["dashboard"]
    assert int(flags["port"]) == PORTS["gcs"]
    assert int(flags["ray-client-server-port"]) == PORTS["client"]
    worker_cmd = next(c for c in cfg["worker_start_ray_commands"] if "ray start" in c)
    assert start_flags(worker_cmd)["address"] == f"$RAY_HEAD_IP:{PORTS['gcs']}"


# --------------------------------------------------------------------------------------
# One image, tagged with the project version
# --------------------------------------------------------------------------------------


def test_image_is_the_project_version_everywhere():
    image = cluster_config()["docker"]["image"]
    name, _, tag = image.rpartition(":")
    assert tag == f"{pyproject()['project']['version']}-gpu"
    images = [img for doc in manifests() for img in find_key(doc, "image")]
    assert len(images) >= 4  # head + workers of the RayCluster and RayJob, MLflow
    assert set(images) == {image}, f"every manifest must run {image}"
    assert name in (INFRA / "README.md").read_text() and image in (INFRA / "README.md").read_text()


# --------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------


def test_dockerfile_python_satisfies_requires_python():
    from packaging.specifiers import SpecifierSet

    args = dockerfile_args()
    spec = SpecifierSet(pyproject()["project"]["requires-python"])
    assert args["PYTHON_VERSION"] in spec
    text = DOCKERFILE.read_text()
    assert 'python${PYTHON_VERSION}" -m venv' in text  # the venv is built with that Python


def test_dockerfile_cuda_base_gpu_extra_and_versions():
    from packaging.requirements import Requirement

    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.MULTILINE)
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    cuda = re.search(r":(\d+)\.(\d+)", args["CUDA_IMAGE"]).groups()
    assert args["TORCH_INDEX"].endswith("/cu" + "".join(cuda)), "torch built for the image's CUDA"
    assert re.search(r'pip install[^\n]*"/app\[gpu\]"', text), "the project with the gpu extra"
    assert "gpu" in pyproject()["project"]["optional-dependencies"]
    deps = {Requirement(d).name: Requirement(d) for d in pyproject()["project"]["dependencies"]}
    assert args["TORCH_VERSION"] in deps["torch"].specifier
    assert args["RAY_VERSION"] in deps["ray"].specifier
    assert "ray[default" in text, "the dashboard / Jobs API on cluster nodes"


def test_dockerfile_runs_as_non_root_with_the_manifests_uid():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    uid = int(re.search(rf"useradd[^\n]*--uid (\d+)[^\n]*\b{users[-1]}\b", text).group(1))
    assert uid != 0
    run_as = {v for doc in manifests() for v in find_key(doc, "runAsUser")}
    assert run_as == {uid}
    for doc in manifests():
        assert all(find_key(doc, "runAsNonRoot")), "pods run as non-root"


def test_dockerfile_workdir_is_the_rayjob_working_dir():
    workdir = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)[-1]
    runtime_env = yaml.safe_load(ray_job()["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == workdir
    assert re.search(rf"^COPY \. {re.escape(workdir)}\b", DOCKERFILE.read_text(), re.MULTILINE)


def test_dockerfile_ray_version_matches_kuberay():
    ray_version = dockerfile_args()["RAY_VERSION"]
    assert ray_cluster_spec()["rayVersion"] == ray_version
    assert ray_job()["spec"]["rayClusterSpec"]["rayVersion"] == ray_version


def test_dockerfile_exposes_the_ports():
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", DOCKERFILE.read_text(), re.MULTILINE)
               for p in line.split()}
    assert set(PORTS.values()) <= exposed


# --------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "dashboard not exposed publicly"
    params = head["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values()), "KubeRay wants string values"
    assert int(params["port"]) == PORTS["gcs"]
    assert int(params["dashboard-port"]) == PORTS["dashboard"]
    assert int(params["ray-client-server-port"]) == PORTS["client"]
    (container,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"gcs-server": PORTS["gcs"], "dashboard": PORTS["dashboard"], "client": PORTS["client"]}
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"], "autoscaled"
        (worker,) = group["template"]["spec"]["containers"]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]


def test_raycluster_manifest():
    _check_ray_cluster_spec(ray_cluster_spec())
    gpus = [int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            for g in ray_cluster_spec()["workerGroupSpecs"]]
    assert 1 in gpus and max(gpus) > 1


def test_rayjob_manifest_runs_a_real_job_with_a_real_config():
    from srplatform.config import load_config

    job = ray_job()
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "-m"]
    module = argv[2]
    assert module.startswith("jobs.") and (ROOT / "jobs" / f"{module.split('.', 1)[1]}.py").is_file()
    config = argv[argv.index("--config") + 1]
    assert config == "jobs/configs/swinir_l.yaml"
    load_config(ROOT / config)  # exists and validates


def test_nothing_is_exposed_publicly():
    for doc in manifests():
        assert doc["kind"] != "Ingress"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
        for service_type in find_key(doc, "serviceType"):
            assert service_type == "ClusterIP"


# --------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------


def _mlflow_args() -> dict[str, str]:
    deployment, _ = mlflow_docs()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    out = {}
    for arg in container["args"]:
        name, _, value = arg.partition("=")
        out[name] = value
    return out


def test_mlflow_server_settings():
    deployment, service = mlflow_docs()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = _mlflow_args()
    assert int(args["--port"]) == PORTS["mlflow"]
    assert "--serve-artifacts" in args
    assert args["--artifacts-destination"].startswith("s3://")
    assert "--backend-store-uri" not in args, "the database URI comes from a Secret"
    env = {e["name"]: e for e in container["env"]}
    ref = env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    (port,) = container["ports"]
    assert port["containerPort"] == PORTS["mlflow"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": PORTS["mlflow"]}
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["port"] == PORTS["mlflow"] and svc_port["targetPort"] in (port["name"], PORTS["mlflow"])
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_ray_pods_track_to_the_mlflow_service():
    _, service = mlflow_docs()
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    expected = f"http://{name}.{namespace}.svc.cluster.local:{PORTS['mlflow']}"
    uris = [e["value"] for path in (RAYCLUSTER, RAYJOB) for doc in load_all(path)
            for env in find_key(doc, "env") for e in env if e["name"] == "MLFLOW_TRACKING_URI"]
    assert uris and set(uris) == {expected}
    allowed = _mlflow_args()["--allowed-hosts"].split(",")
    assert f"{name}.{namespace}.svc.cluster.local:{PORTS['mlflow']}" in allowed
    for path in (RAYCLUSTER, RAYJOB):
        assert all(d["metadata"]["namespace"] == namespace for d in load_all(path))


def test_mlflow_accepts_the_manifest_arguments(monkeypatch):
    """The installed MLflow's own CLI parser accepts the manifest's `mlflow server` arguments
    (click parses without running the server), reads the backend store from the variable the
    manifest fills from the Secret, serves /health (the probes' path), and its Host-header check
    admits the Service's DNS name and rejects others."""
    import click
    import mlflow.environment_variables as mlflow_env
    from mlflow.cli import server
    from mlflow.server import app
    from mlflow.server.security_utils import is_allowed_host_header

    deployment, service = mlflow_docs()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"] for e in container["env"]}
    assert "MLFLOW_BACKEND_STORE_URI" in env and mlflow_env.MLFLOW_S3_ENDPOINT_URL.name in env
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", "postgresql://user:pw@db:5432/mlflow")
    params = server.make_context("mlflow server", list(container["args"])).params
    assert params["backend_store_uri"] == "postgresql://user:pw@db:5432/mlflow"
    assert params["port"] == PORTS["mlflow"] and params["serve_artifacts"] is True
    assert params["artifacts_destination"].startswith("s3://")
    with pytest.raises(click.UsageError):  # the parser does reject what it does not know
        server.make_context("mlflow server", ["--serve-artifact"])
    assert "/health" in {rule.rule for rule in app.url_map.iter_rules()}
    allowed = params["allowed_hosts"].split(",")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    for host in (f"{name}.{namespace}.svc.cluster.local:{PORTS['mlflow']}", f"{name}:{PORTS['mlflow']}",
                 f"localhost:{PORTS['mlflow']}"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example.com")
