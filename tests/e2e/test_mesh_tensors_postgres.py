"""Tensor locations in a shared PostgreSQL store: a tensor uploaded through
orchestrator X (stored on X's node) is downloaded, used by a task and deleted
through orchestrator Y."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from mesh_procs import ready_nodes, wait_for
from test_mesh_tensors import download, holder, relu_of, upload

from kernelmesh.v1 import task_pb2, task_pb2_grpc

pytestmark = pytest.mark.e2e


def test_upload_through_x_download_and_delete_through_y(dsn, procs):
    x = procs.orchestrator("--store", dsn, "--lease-seconds", "4", "--name", "orch-x", name="x")
    y = procs.orchestrator("--store", dsn, "--lease-seconds", "4", "--name", "orch-y", name="y")
    procs.node("node-a", x.target, "--backends", "cpu")
    for orch in (x, y):
        wait_for(lambda o=orch: ready_nodes(o.target) == {"node-a"}, what=f"node-a on {orch}")
    data = np.linspace(-2, 2, 3000, dtype=np.float32)
    with grpc.insecure_channel(x.target) as cx, grpc.insecure_channel(y.target) as cy:
        via_x = task_pb2_grpc.TaskServiceStub(cx)
        via_y = task_pb2_grpc.TaskServiceStub(cy)
        ref = upload(via_x, data)
        assert holder(ref) == "node-a"
        np.testing.assert_array_equal(download(via_y, ref.name), data)

        def ran_on_y() -> task_pb2.Task | None:
            try:  # placed by the record once Y's round has read it
                return via_y.RunTask(relu_of(ref.name), timeout=60).task
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                return None

        task = wait_for(ran_on_y, what="a task on Y naming the tensor")
        assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task.error
        assert task.device == "node-a/cpu:0"
        np.testing.assert_array_equal(
            np.frombuffer(task.outputs[0].data, np.float32), np.maximum(data, 0)
        )

        via_y.DeleteTensor(task_pb2.DeleteTensorRequest(name=ref.name), timeout=30)
        for stub in (via_x, via_y):
            with pytest.raises(grpc.RpcError) as gone:
                download(stub, ref.name)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
