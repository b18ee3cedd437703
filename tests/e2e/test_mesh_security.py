"""A node's own port with real processes (issue 8): with --auth it answers only
the orchestrators it joined (the token it registered with); with mutual TLS a
caller whose certificate another CA signed is refused; work still flows from
the orchestrator to the node. An orchestrator with --auth admits only nodes
that join with a node key."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mesh_pki import issue
from mesh_procs import ready_nodes, wait_for

from kernelmesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc, task_pb2, task_pb2_grpc

pytestmark = pytest.mark.e2e


def relu_request() -> task_pb2.RunTaskRequest:
    x = np.arange(-3, 3, dtype=np.float32)
    request = task_pb2.RunTaskRequest()
    request.task.op = "relu"
    tensor = request.task.inputs.add().tensor
    tensor.dtype, tensor.data = 1, x.tobytes()  # DTYPE_FLOAT32
    tensor.shape.append(x.size)
    return request


def run_on(channel: grpc.Channel, metadata=()) -> task_pb2.Task:
    stub = task_pb2_grpc.TaskServiceStub(channel)
    return stub.RunTask(relu_request(), timeout=60, metadata=metadata).task


def test_a_node_with_auth_answers_only_its_orchestrator(procs):
    orch = procs.orchestrator("--store", "memory")
    node = procs.node("node-a", orch.target, "--backends", "cpu", "--auth")
    wait_for(lambda: ready_nodes(orch.target) == {"node-a"}, what="node-a READY")

    with grpc.insecure_channel(node.target) as channel:
        for metadata in ((), (("authorization", "Bearer not-the-token"),)):
            with pytest.raises(grpc.RpcError) as refused:
                run_on(channel, metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "orchestrator" in refused.value.details()
        # probes still reach it
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status in (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    with grpc.insecure_channel(orch.target) as channel:
        task = run_on(channel)
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task.error
    assert task.device == "node-a/cpu:0"
    out = np.frombuffer(task.outputs[0].data, np.float32)
    assert out.tolist() == [0, 0, 0, 0, 1, 2]
    # the token travels in the registration and is never shown back
    with grpc.insecure_channel(orch.target) as channel:
        nodes = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).ListNodes(
            orchestrator_pb2.ListNodesRequest(), timeout=10
        )
    assert "node_token" not in str(nodes)


def test_a_node_beyond_loopback_needs_auth_or_insecure_open(tmp_path):
    # refused before anything is bound
    refused = subprocess.run(
        [
            *(sys.executable, "-m", "kernelmesh.clients", "node", "--name", "n"),
            *("--join", "127.0.0.1:1", "--host", "0.0.0.0", "--port", "0", "--no-http"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert refused.returncode == 2, refused
    assert "only its orchestrators may call it" in refused.stderr
    assert "--insecure-open" in refused.stderr


def test_an_orchestrator_with_auth_admits_nodes_with_a_node_key(procs, tmp_path):
    state = tmp_path / "orch-state"
    orch = procs.orchestrator("--store", "memory", "--auth", "--state-dir", str(state))
    admin = [("authorization", f"Bearer {(state / 'bootstrap-admin.key').read_text().strip()}")]
    with grpc.insecure_channel(orch.target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        created = stub.CreateApiKey(
            orchestrator_pb2.CreateApiKeyRequest(
                tenant="default", role=orchestrator_pb2.API_KEY_ROLE_NODE, label="node-a"
            ),
            metadata=admin,
            timeout=10,
        )

        def ready() -> set[str]:
            listed = stub.ListNodes(orchestrator_pb2.ListNodesRequest(), metadata=admin, timeout=10)
            return {n.name for n in listed.nodes if n.state == orchestrator_pb2.NODE_STATE_READY}

        keyless = procs.node("keyless", orch.target, "--backends", "cpu", "--auth")
        procs.node(
            "node-a",
            orch.target,
            "--backends",
            "cpu",
            "--auth",
            env={"KERNELMESH_API_KEY": created.secret},
        )
        wait_for(lambda: ready() == {"nodes/node-a"}, what="node-a READY")
        wait_for(lambda: "UNAUTHENTICATED" in keyless.output(), what="keyless refused")
        assert ready() == {"nodes/node-a"}
        task = run_on(channel, admin)
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task.error
    assert task.device == "node-a/cpu:0"


def test_mutual_tls_between_orchestrator_and_node(procs, tmp_path):
    ca = issue(tmp_path, "mesh-ca", ca=True)
    other_ca = issue(tmp_path, "other-ca", ca=True)
    orch_cert = issue(tmp_path, "orchestrator", ca)
    node_cert = issue(tmp_path, "node", ca)
    stranger = issue(tmp_path, "stranger", other_ca)
    tls = ("--tls-cert", str(orch_cert.cert), "--tls-key", str(orch_cert.key))
    orch = procs.orchestrator(
        "--store", "memory", *tls, "--tls-client-ca", str(ca.cert), "--node-ca", str(ca.cert)
    )
    node = procs.node(
        "node-a",
        orch.target,
        "--backends",
        "cpu",
        "--auth",
        "--tls-cert",
        str(node_cert.cert),
        "--tls-key",
        str(node_cert.key),
        "--tls-client-ca",
        str(ca.cert),
        "--join-ca",
        str(ca.cert),
    )

    def credentials(client):
        return grpc.ssl_channel_credentials(
            ca.cert_pem, private_key=client.key_pem, certificate_chain=client.cert_pem
        )

    client = issue(tmp_path, "client", ca)
    with grpc.secure_channel(orch.target, credentials(client)) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)

        def ready() -> set[str]:
            listed = stub.ListNodes(orchestrator_pb2.ListNodesRequest(), timeout=10)
            return {n.name for n in listed.nodes if n.state == orchestrator_pb2.NODE_STATE_READY}

        wait_for(lambda: ready() == {"nodes/node-a"}, what="node-a joined over mutual TLS")
        task = run_on(channel)
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task.error
    assert task.device == "node-a/cpu:0"

    # The node's port: a certificate from another CA (or none) is refused in the
    # handshake; one from the mesh's CA gets as far as the token check.
    for who in (credentials(stranger), grpc.ssl_channel_credentials(ca.cert_pem)):
        with grpc.secure_channel(node.target, who) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                run_on(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(node.target, credentials(client)) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            run_on(channel)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
