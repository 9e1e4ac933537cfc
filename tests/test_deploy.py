"""What stands a cluster up, checked where it cannot run here: the launcher YAML against
Ray's own schema and config checks, the KubeRay manifests' Kubernetes core objects against
the Kubernetes schema (kubernetes-validate), the image's pins against the project's, and the
constraints file resolved by pip. A cloud, a Kubernetes cluster and docker are not here."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
KUBE_VERSION = "1.30"  # the oldest Kubernetes the manifests are checked against


def pins() -> dict[str, str]:
    """constraints.txt as {package: version}."""
    lines = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    found = (line.split("==") for line in lines if "==" in line and not line.startswith("#"))
    return {name.lower(): version for name, version in found}


def test_the_launcher_yaml_passes_rays_schema_and_config_checks():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((DEPLOY / "cluster-aws.yaml").read_text())
    jsonschema.validate(config, schema)
    validate_config(config)
    validate_config(prepare_config(config))  # with the AWS defaults filled in, as `ray up`
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 < workers["max_workers"]  # autoscaled from zero
    assert config["docker"]["image"].endswith(":gpu") and config["docker"]["head_image"].endswith(
        ":cpu"
    )
    broken = {**config, "head_node_type": "nowhere"}
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(broken)


def manifests() -> list[dict]:
    return [
        doc
        for path in sorted((DEPLOY / "kuberay").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [group["template"] for group in groups]


def test_kuberay_manifests_hold_valid_kubernetes_objects_and_the_projects_image():
    import kubernetes_validate

    docs = manifests()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["RayCluster", "RayJob", "Secret", "ServiceAccount"]
    ray_version = pins()["ray"]
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            assert doc["apiVersion"] == "ray.io/v1"
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            assert spec["rayVersion"] == ray_version  # the image's Ray (constraints.txt)
            for template in pod_templates(doc):
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "t"}, **template}
                kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
                [container] = template["spec"]["containers"]
                assert re.fullmatch(
                    r"ghcr\.io/YOUR_ORG/progan-pipeline:(cpu|gpu)", container["image"]
                )
                env = {e["name"]: e for e in container["env"]}
                assert "secretKeyRef" in env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]  # not inline
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    broken = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "t"}, "spec": {"x": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


def test_the_rayjob_runs_a_progan_command_line_that_parses():
    from pipeline.cli import build_parser

    [job] = [d for d in manifests() if d["kind"] == "RayJob"]
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["progan", "run"]
    args, extra = build_parser().parse_known_args(words[1:])
    assert args.command == "run" and (REPO_ROOT / args.config).is_file()
    assert all("=" in w for w in extra) and args.run_id  # overrides; a fixed id resumes


def test_the_image_is_the_pinned_ray_and_python_and_installs_from_the_constraints():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    [base] = re.findall(r"ARG BASE=rayproject/ray:(\S+)", dockerfile)
    version, python, _ = base.split("-")
    assert version == pins()["ray"]
    assert python == f"py{sys.version_info.major}{sys.version_info.minor}"  # the tests' Python
    assert "-c constraints.txt" in dockerfile
    assert "-c constraints.txt" in (REPO_ROOT / "Makefile").read_text()  # make uses it too
    import importlib.metadata

    for package in ("torch", "ray", "mlflow", "safetensors"):  # what the tests run is pinned
        assert importlib.metadata.version(package).split("+")[0] == pins()[package]


@pytest.mark.slow  # pip resolves the whole set (~30 s)
def test_the_constraints_file_resolves_for_a_fresh_install(tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
         "-c", str(REPO_ROOT / "constraints.txt"), f"{REPO_ROOT}[dev]", "--report", str(report)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    wanted = pins()
    off = {k: (v, wanted[k]) for k, v in chosen.items() if k in wanted and v != wanted[k]}
    assert off == {}
