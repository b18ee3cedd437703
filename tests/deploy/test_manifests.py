"""The Kubernetes manifests in deploy/ (issue 8): rendered as `kubectl apply -k`
would render them, valid against Kubernetes' schemas in strict mode (unknown
fields are errors) with no network, and wired together: the Services select
the orchestrators, nodes join the orchestrator Service, the PostgreSQL URL
comes from the Secret, probes are native gRPC health checks, every container
runs as non-root on a read-only root filesystem with requests and limits."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kustomize_render import KustomizeError, json6902, render, strategic_merge

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BASE = DEPLOY / "base"
GPU = DEPLOY / "overlays" / "gpu"
SECRET = DEPLOY / "examples" / "store-secret.example.yaml"
# The oldest Kubernetes the manifests claim (native gRPC probes are GA since
# 1.27) and the newest whose schemas kubernetes-validate ships.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
GRPC_PORT = 50051


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    return resource["spec"]["template"]["spec"]


def workloads(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


@pytest.fixture(scope="module", params=["base", "gpu"])
def rendered(request) -> list[dict[str, Any]]:
    return render(BASE if request.param == "base" else GPU)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_rendered_manifest_is_valid_in_strict_mode(rendered, version):
    assert rendered
    for resource in rendered:
        kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_example_secret_is_valid_and_a_placeholder(version):
    [secret] = list(yaml.safe_load_all(SECRET.read_text()))
    kubernetes_validate.validate(secret, version, strict=True)
    assert "CHANGE-ME" in secret["stringData"]["url"]
    assert "NOT A REAL CREDENTIAL" in SECRET.read_text()
    # Not applied with the kustomization: a placeholder must never reach a cluster.
    assert all(r["kind"] != "Secret" for r in render(BASE))


def test_strict_validation_rejects_an_unknown_field():
    """The check can fail: a misspelt field is an error, not silently dropped."""
    deployment = find(render(BASE), "Deployment", "kernelmesh-orchestrator")
    pod_spec(deployment)["containers"][0]["livenessprobe"] = {"grpc": {"port": GRPC_PORT}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_two_orchestrators_take_the_postgresql_url_from_the_secret():
    deployment = find(render(BASE), "Deployment", "kernelmesh-orchestrator")
    assert deployment["spec"]["replicas"] == 2
    [container] = pod_spec(deployment)["containers"]
    command = shlex.join(container["command"] + container["args"])
    assert command.startswith("kernelmesh orchestrator --store '$(KERNELMESH_STORE)'")
    # it listens beyond loopback, where the server refuses to run without keys
    assert "--auth" in container["args"] and "--state-dir" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["KERNELMESH_STORE"]["valueFrom"]["secretKeyRef"] == {
        "name": "kernelmesh-store",
        "key": "url",
    }
    secret = yaml.safe_load(SECRET.read_text())
    assert secret["metadata"]["name"] == "kernelmesh-store" and "url" in secret["stringData"]


def test_services_select_the_orchestrators_and_one_is_headless(rendered):
    deployment = find(rendered, "Deployment", "kernelmesh-orchestrator")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = find(rendered, "Service", "kernelmesh-orchestrator")
    headless = find(rendered, "Service", "kernelmesh-orchestrator-headless")
    assert headless["spec"]["clusterIP"] == "None"
    for svc in (service, headless):
        assert svc["spec"]["selector"].items() <= labels.items()
        grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["port"] == GRPC_PORT and grpc_port["targetPort"] == "grpc"


def test_nodes_join_the_orchestrator_service(rendered):
    daemonset = find(rendered, "DaemonSet", "kernelmesh-node")
    [container] = pod_spec(daemonset)["containers"]
    args = container["command"] + container["args"]
    assert args[:2] == ["kernelmesh", "node"]
    join = args[args.index("--join") + 1]
    host, port = join.rsplit(":", 1)
    service = find(rendered, "Service", host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]


NODE_KEY = DEPLOY / "examples" / "node-key-secret.example.yaml"


def test_nodes_admit_only_their_orchestrators_and_join_with_a_node_key(rendered):
    daemonset = find(rendered, "DaemonSet", "kernelmesh-node")
    [container] = pod_spec(daemonset)["containers"]
    # beyond loopback a node refuses to start open: --auth admits only the
    # orchestrators it joined
    assert "--auth" in container["args"] and "--insecure-open" not in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["KERNELMESH_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "kernelmesh-node-key",
        "key": "api-key",
    }
    [secret] = list(yaml.safe_load_all(NODE_KEY.read_text()))
    kubernetes_validate.validate(secret, VERSIONS[-1], strict=True)
    assert secret["metadata"]["name"] == "kernelmesh-node-key"
    assert "CHANGE-ME" in secret["stringData"]["api-key"]
    assert "NOT A REAL CREDENTIAL" in NODE_KEY.read_text()


def test_probes_are_native_grpc_health_checks(rendered):
    for workload in workloads(rendered):
        for container in pod_spec(workload)["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports == {"grpc": GRPC_PORT, "http": 8080}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert container[probe]["grpc"]["port"] == GRPC_PORT, (workload, probe)
            assert container["readinessProbe"]["grpc"]["service"] == "kernelmesh.v1.TaskService"


def test_containers_run_unprivileged_with_resources(rendered):
    for workload in workloads(rendered):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys()
            assert {"cpu", "memory"} <= resources["limits"].keys()
            for mount in container["volumeMounts"]:
                assert "emptyDir" in volumes[mount["name"]], mount
            mounted = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounted and "/var/cache/kernelmesh" in mounted


def test_everything_is_in_the_kernelmesh_namespace(rendered):
    for resource in rendered:
        if resource["kind"] == "Namespace":
            assert resource["metadata"]["name"] == "kernelmesh"
        else:
            assert resource["metadata"]["namespace"] == "kernelmesh", resource["metadata"]


def test_the_gpu_overlay_puts_nodes_on_gpus():
    daemonset = find(render(GPU), "DaemonSet", "kernelmesh-node")
    spec = pod_spec(daemonset)
    [container] = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["cpu"] == "1", "the base's requests are kept"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert container["image"] == "kernelmesh:0.1.0-cuda"
    assert container["args"][-2:] == ["--backends", "cpu,cuda"]
    env = {e["name"] for e in container["env"]}
    assert {"K8S_NODE_NAME", "NVIDIA_VISIBLE_DEVICES"} <= env, "env merged by name"
    # The orchestrators stay on the CPU image, without GPUs.
    orchestrator = pod_spec(find(render(GPU), "Deployment", "kernelmesh-orchestrator"))
    assert orchestrator["containers"][0]["image"] == "kernelmesh:0.1.0"
    assert "nodeSelector" not in orchestrator


# -- the renderer itself ------------------------------------------------------


def test_strategic_merge_merges_named_lists_and_replaces_others():
    original = {
        "containers": [{"name": "a", "image": "x", "args": ["1"]}, {"name": "b"}],
        "tolerations": [{"key": "old"}],
        "labels": {"keep": "1", "drop": "2"},
    }
    patch = {
        "containers": [{"name": "a", "args": ["2"]}, {"name": "c"}],
        "tolerations": [{"key": "new"}],
        "labels": {"drop": None, "add": "3"},
    }
    assert strategic_merge(original, patch) == {
        "containers": [{"name": "a", "image": "x", "args": ["2"]}, {"name": "b"}, {"name": "c"}],
        "tolerations": [{"key": "new"}],
        "labels": {"keep": "1", "add": "3"},
    }


def test_json6902_add_replace_remove():
    doc = {"spec": {"args": ["a"], "name": "x"}}
    json6902(doc, {"op": "add", "path": "/spec/args/-", "value": "b"})
    json6902(doc, {"op": "add", "path": "/spec/args/0", "value": "z"})
    json6902(doc, {"op": "replace", "path": "/spec/name", "value": "y"})
    json6902(doc, {"op": "remove", "path": "/spec/args/1"})
    assert doc == {"spec": {"args": ["z", "b"], "name": "y"}}


def test_the_renderer_refuses_what_it_does_not_support(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(KustomizeError, match="commonLabels"):
        render(tmp_path)
