"""A node that lies: it registers an op and answers with a result of the wrong
shape or dtype. The orchestrator refuses the result and fails the attempt with
a clear error; the node can then be drained."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
from mesh_procs import add_request

from kernelmesh.core.mesh.nodes import VERSION
from kernelmesh.v1 import (
    device_pb2,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
    tensor_pb2,
)


class LyingTasks(task_pb2_grpc.TaskServiceServicer):
    """Answers every RunTask with `answer`, whatever was asked."""

    def __init__(self, answer: tensor_pb2.Tensor) -> None:
        self.answer = answer
        self.calls = 0

    async def RunTask(self, request, context):
        self.calls += 1
        reply = task_pb2.RunTaskResponse()
        reply.task.state = task_pb2.TASK_STATE_SUCCEEDED
        reply.task.outputs.append(self.answer)
        return reply


@pytest.fixture
async def orchestrator(server_config, start_server):
    config = dataclasses.replace(server_config, role="orchestrator", with_node=False)
    return await start_server(config)


async def _liar(answer: tensor_pb2.Tensor):
    server = grpc.aio.server()
    servicer = LyingTasks(answer)
    task_pb2_grpc.add_TaskServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, port


@pytest.mark.parametrize(
    "answer, described",
    [
        (
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3], data=bytes(12)),
            "float32[3], expected float32[4]",
        ),
        (
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[4], data=bytes(32)),
            "float64[4], expected float32[4]",
        ),
    ],
    ids=["shape", "dtype"],
)
async def test_a_result_of_the_wrong_shape_or_dtype_is_refused(orchestrator, answer, described):
    liar, servicer, port = await _liar(answer)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
            mesh = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            await mesh.RegisterNode(
                orchestrator_pb2.RegisterNodeRequest(
                    name="liar",
                    address=f"127.0.0.1:{port}",
                    version=VERSION,
                    devices=[device_pb2.Device(name="cpu:0", kind=device_pb2.DEVICE_KIND_CPU)],
                    capabilities=[
                        orchestrator_pb2.DeviceCapability(device="cpu:0", ops=["add:float32"])
                    ],
                )
            )
            tasks = task_pb2_grpc.TaskServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await tasks.RunTask(add_request(np.ones(4, np.float32)), timeout=30)
            assert err.value.code() is grpc.StatusCode.INTERNAL
            assert "result refused" in err.value.details()
            assert described in err.value.details()
            assert servicer.calls == 1
            drained = await mesh.DrainNode(orchestrator_pb2.DrainNodeRequest(name="nodes/liar"))
            assert drained.node.state == orchestrator_pb2.NODE_STATE_DRAINING
            # No other node: nothing can run it now, and the reason says so.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await tasks.RunTask(add_request(np.ones(4, np.float32)), timeout=30)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert servicer.calls == 1
    finally:
        await liar.stop(None)
