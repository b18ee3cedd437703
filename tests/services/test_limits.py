"""Limits before allocation, and bad input answered INVALID_ARGUMENT (never
INTERNAL or UNKNOWN), on a real in-process server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import aiohttp
import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from helpers import rich_status, spec, violations

from kernelmesh.core.limits import Quotas
from kernelmesh.core.ops import CATALOG, ParamType
from kernelmesh.v1 import (
    device_pb2,
    device_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
    tensor_pb2,
)

MiB = 1 << 20


def _retry_info(err: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    for detail in rich_status(err).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info
    return None


@pytest.fixture
async def limited(server_config, start_server):
    quotas = Quotas(max_bytes_per_tenant=1 * MiB, max_tasks_per_tenant=64, max_labels=4)
    return await start_server(dataclasses.replace(server_config, quotas=quotas))


@pytest.fixture
async def stub(limited):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as chan:
        yield task_pb2_grpc.TaskServiceStub(chan)


def _header(shape, dtype=tensor_pb2.DTYPE_FLOAT32) -> task_pb2.UploadTensorRequest:
    return task_pb2.UploadTensorRequest(header=task_pb2.TensorHeader(dtype=dtype, shape=shape))


async def test_an_upload_header_alone_allocates_nothing(stub, limited):
    # Declares 4 MiB, past the tenant's 1 MiB quota by itself: only chunks count.
    call = stub.UploadTensor()
    await call.write(_header([1 << 20]))
    await call.write(task_pb2.UploadTensorRequest(chunk=b"\0" * 4096))
    # The chunk is charged as it arrives: exactly its bytes, not the declared size.
    for _ in range(200):
        if limited.ledger.bytes_of("default") == 4096:
            break
        await asyncio.sleep(0.01)
    assert limited.ledger.bytes_of("default") == 4096
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # too few bytes
    assert limited.ledger.bytes_of("default") == 0  # given back


async def test_uploads_past_the_tenant_quota_are_resource_exhausted(stub, limited):
    async def upload(tenant: str, nbytes: int):
        async def parts():
            yield _header([nbytes // 4])
            for start in range(0, nbytes, 64 << 10):
                yield task_pb2.UploadTensorRequest(chunk=b"\1" * min(64 << 10, nbytes - start))

        return await stub.UploadTensor(parts(), metadata=[("kernelmesh-tenant", tenant)])

    first = await upload("a", 768 << 10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await upload("a", 512 << 10)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _retry_info(info.value) is not None
    assert limited.ledger.bytes_of("a") == 768 << 10  # the refused upload holds nothing
    await upload("b", 512 << 10)  # another tenant has its own quota
    await stub.DeleteTensor(
        task_pb2.DeleteTensorRequest(name=first.tensor.name), metadata=[("kernelmesh-tenant", "a")]
    )
    assert limited.ledger.bytes_of("a") == 0
    await upload("a", 512 << 10)


async def test_a_chunk_past_the_configured_maximum_is_invalid_argument(server_config, start_server):
    quotas = Quotas(max_upload_chunk_bytes=64 << 10)
    server = await start_server(dataclasses.replace(server_config, quotas=quotas))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        stub = task_pb2_grpc.TaskServiceStub(chan)

        async def upload(*sizes: int):
            async def parts():
                yield _header([-(-sum(sizes) // 4)])  # float32: room for every byte
                for size in sizes:
                    yield task_pb2.UploadTensorRequest(chunk=b"\1" * size)

            return await stub.UploadTensor(parts())

        assert (await upload(64 << 10, 64 << 10)).tensor.size_bytes == 128 << 10
        for sizes in [(64 << 10, (64 << 10) + 1), (1 << 20,)]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await upload(*sizes)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, sizes
            assert "chunk" in violations(info.value), sizes
            assert "max_upload_chunk_bytes" in violations(info.value)["chunk"]
        assert server.ledger.bytes_of("default") == 128 << 10  # the refused ones hold nothing


async def test_the_clients_chunks_fit_the_default_maximum(server):
    from kernelmesh.clients import tensors
    from kernelmesh.clients.aio import AsyncClient

    assert Quotas().max_upload_chunk_bytes >= tensors.CHUNK_BYTES
    x = np.arange(3 * (1 << 20), dtype=np.float32)  # 12 MiB: three full 4 MiB chunks
    async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60.0) as client:
        ref = await client.upload(x)
        assert ref.size_bytes == x.nbytes


async def test_the_server_wide_byte_quota_holds_across_tenants(server_config, start_server):
    quotas = Quotas(max_bytes_per_tenant=1 * MiB, max_bytes_total=3 * MiB // 2)
    server = await start_server(dataclasses.replace(server_config, quotas=quotas))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        stub = task_pb2_grpc.TaskServiceStub(chan)

        async def upload(tenant: str, nbytes: int):
            async def parts():
                yield _header([nbytes // 4])
                yield task_pb2.UploadTensorRequest(chunk=b"\1" * nbytes)

            return await stub.UploadTensor(parts(), metadata=[("kernelmesh-tenant", tenant)])

        await upload("a", 768 << 10)
        # b is within its own 1 MiB, but a and b together would pass the 1.5 MiB
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await upload("b", 1 * MiB)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "for all tenants" in info.value.details()
        assert _retry_info(info.value) is not None
        assert server.ledger.bytes_of("b") == 0
        assert server.ledger.total_bytes == 768 << 10
        await upload("b", 512 << 10)  # what is left of the server's quota
        assert server.ledger.total_bytes == 1280 << 10


async def test_configured_http_limits_apply(server_config, start_server):
    quotas = Quotas(max_http_body_bytes=4096, max_json_depth=4, max_json_int_digits=5)
    server = await start_server(dataclasses.replace(server_config, quotas=quotas))
    url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json={"model": "local", "input": "x" * 5000}) as r:
            assert r.status == 413
            assert "4096 bytes" in (await r.json())["error"]["message"]
        for body, why in [
            ({"model": "local", "input": [[[["hi"]]]]}, "5 levels"),
            ({"model": "local", "input": "hi", "dimensions": 123456}, "6 digits"),
        ]:
            async with session.post(url, json=body) as r:
                assert r.status == 400, why
                assert (await r.json())["error"]["code"] == "invalid_json", why
        async with session.post(url, json={"model": "local", "input": ["hi"]}) as r:
            assert r.status == 200


async def test_an_http_body_limit_above_the_default_is_honoured(server_config, start_server):
    quotas = Quotas(max_http_body_bytes=40 * MiB)
    server = await start_server(dataclasses.replace(server_config, quotas=quotas))
    url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
    json_type = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        # 33 MiB: past the 32 MiB default, within the configured 40 (then refused
        # as the invalid JSON it is, not as too large)
        async with session.post(url, data=b" " * (33 * MiB), headers=json_type) as r:
            assert r.status == 400
        async with session.post(url, data=b" " * (41 * MiB), headers=json_type) as r:
            assert r.status == 413


async def test_task_inputs_count_against_the_tenant_quota(stub):
    big = np.ones(200_000, np.float32)  # 800 KB in + 800 KB out > 1 MiB
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitTask(task_pb2.SubmitTaskRequest(task=spec("exp", big)))
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _retry_info(info.value) is not None


async def test_too_many_labels_is_invalid_argument(stub):
    msg = spec("exp", np.ones(4, np.float32))
    for i in range(5):
        msg.labels[f"k{i}"] = "v"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RunTask(task_pb2.RunTaskRequest(task=msg))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "task.labels" in violations(info.value)


async def test_configured_quotas_apply_to_shared_memory_tasks(server_config, start_server):
    from kernelmesh.clients.aio import AsyncClient
    from kernelmesh.clients.types import task_spec

    quotas = Quotas(max_labels=2, max_dims=3)
    server = await start_server(dataclasses.replace(server_config, quotas=quotas))
    async with (
        AsyncClient(f"127.0.0.1:{server.port}", timeout=30.0) as km,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan,
    ):
        stub = task_pb2_grpc.TaskServiceStub(chan)
        region = await km.shared_memory(1 << 16)
        arg = region.put(np.arange(16, dtype=np.float32))  # read from shared memory
        two = {"a": "1", "b": "2"}
        ok = await stub.RunTask(
            task_pb2.RunTaskRequest(task=task_spec("relu", (arg,), {}, labels=two))
        )
        assert ok.task.state == task_pb2.TASK_STATE_SUCCEEDED
        three = task_spec("relu", (arg,), {}, labels={**two, "c": "3"})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RunTask(task_pb2.RunTaskRequest(task=three))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "task.labels" in violations(info.value)
        # an inline operand next to the shared one is held to max_dims too
        four_d = task_spec("add", (arg, np.ones((1, 1, 1, 16), np.float32)), {})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RunTask(task_pb2.RunTaskRequest(task=four_d))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "task.inputs[1].tensor.shape" in violations(info.value)


async def test_a_huge_label_value_is_invalid_argument(stub):
    msg = spec("exp", np.ones(4, np.float32))
    msg.labels["k"] = "v" * 10_000
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RunTask(task_pb2.RunTaskRequest(task=msg))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("shape", "what"),
    [
        ([1] * 40, "too many dimensions"),
        ([1 << 40, 1 << 40], "element count past int64"),
        ([0, 1 << 62, 1 << 62], "zero elements, overflowing other dimensions"),
        ([-1, 4], "a negative dimension"),
    ],
)
async def test_bad_shapes_are_invalid_argument(stub, shape, what):
    msg = task_pb2.TaskSpec(op="exp")
    msg.inputs.add(tensor=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=shape))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RunTask(task_pb2.RunTaskRequest(task=msg))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, what
    with pytest.raises(grpc.aio.AioRpcError) as info:
        call = stub.UploadTensor()
        await call.write(_header(shape))
        await call.done_writing()
        await call
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, what


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e308])
async def test_non_finite_or_huge_params_are_invalid_argument(stub, value):
    msg = spec("sum", np.ones((2, 2), np.float32))
    msg.params["axis"] = value
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RunTask(task_pb2.RunTaskRequest(task=msg))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "task.params.axis" in violations(info.value)


# A valid call of every op with integer params: each param is set to an extreme
# number in turn. An op added to the catalog with INT/INTS params fails
# test_every_op_with_integer_params_is_covered until it is listed here.
_INT_PARAM_CALLS = {
    "sum": (np.ones((2, 2), np.float32),),
    "max": (np.ones((2, 2), np.float32),),
    "mean": (np.ones((2, 2), np.float32),),
    "conv2d": (np.ones((1, 1, 4, 4), np.float32), np.ones((1, 1, 2, 2), np.float32)),
}
_INT_PARAMS = [
    (op.name, p.name)
    for op in CATALOG.values()
    for p in op.params
    if p.type in (ParamType.INT, ParamType.INTS)
]
_EXTREMES = [2**63, -(2**63) * 2, 1e300, 2**62, [1e300, 2], [2**63, 1], [2, 2**62]]


def test_every_op_with_integer_params_is_covered():
    assert {op for op, _ in _INT_PARAMS} == set(_INT_PARAM_CALLS)
    assert ("conv2d", "stride") in _INT_PARAMS and ("conv2d", "padding") in _INT_PARAMS


@pytest.mark.parametrize(("op", "param"), _INT_PARAMS)
@pytest.mark.parametrize("value", _EXTREMES, ids=repr)
async def test_extreme_integer_params_are_invalid_argument(stub, op, param, value):
    kind = next(p.type for p in CATALOG[op].params if p.name == param)
    if isinstance(value, list) and kind is not ParamType.INTS:
        value = value[0]  # an INT param: the list's extreme item alone
    msg = spec(op, *_INT_PARAM_CALLS[op])
    msg.params.update({param: value})
    for call in (
        stub.RunTask(task_pb2.RunTaskRequest(task=msg)),
        stub.SubmitTask(task_pb2.SubmitTaskRequest(task=msg)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert f"task.params.{param}" in violations(info.value)


async def test_unknown_enum_values_are_invalid_argument(stub, limited):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as chan:
        devices = device_pb2_grpc.DeviceServiceStub(chan)
        calls = [
            (stub.ListTasks(task_pb2.ListTasksRequest(state=99)), "state"),
            (stub.ListTasks(task_pb2.ListTasksRequest(view=7)), "view"),
            (stub.GetTask(task_pb2.GetTaskRequest(name="tasks/x", view=5)), "view"),
            (devices.ListDevices(device_pb2.ListDevicesRequest(kind=42)), "kind"),
        ]
        msg = spec("exp", np.ones(2, np.float32))
        msg.device.kind = 77
        calls.append((stub.RunTask(task_pb2.RunTaskRequest(task=msg)), "task.device.kind"))
        msg = spec("exp", np.ones(2, np.float32))
        msg.inputs[0].tensor.dtype = 1234
        calls.append(
            (stub.RunTask(task_pb2.RunTaskRequest(task=msg)), "task.inputs[0].tensor.dtype")
        )
        for call, field in calls:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, field
            assert field in violations(info.value), (field, violations(info.value))


async def test_undecodable_requests_are_invalid_argument_without_a_traceback(limited, caplog):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as chan:
        raw = chan.unary_unary("/kernelmesh.v1.TaskService/GetTask")
        bad_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (string name): two bytes, not UTF-8
        truncated = b"\x0a\x10abc"  # declares 16 bytes, has 3
        with caplog.at_level(logging.DEBUG):
            for payload in (bad_utf8, truncated, b"\xff" * 32):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await raw(payload)
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, payload
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_a_bad_item_in_stream_tasks_fails_alone(stub):
    async def requests():
        yield task_pb2.StreamTasksRequest(
            correlation_id="good-1", task=spec("exp", np.ones(4, np.float32))
        )
        bad = spec("exp", np.ones(4, np.float32))
        bad.device.kind = 99
        yield task_pb2.StreamTasksRequest(correlation_id="bad", task=bad)
        nan = spec("sum", np.ones(4, np.float32))
        nan.params["axis"] = float("nan")
        yield task_pb2.StreamTasksRequest(correlation_id="nan", task=nan)
        yield task_pb2.StreamTasksRequest(
            correlation_id="good-2", task=spec("exp", np.ones(4, np.float32))
        )

    results = {r.correlation_id: r.task async for r in stub.StreamTasks(requests())}
    assert results["good-1"].state == task_pb2.TASK_STATE_SUCCEEDED
    assert results["good-2"].state == task_pb2.TASK_STATE_SUCCEEDED
    for cid in ("bad", "nan"):
        assert results[cid].state == task_pb2.TASK_STATE_FAILED
        assert results[cid].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_error_messages_quoting_input_stay_small(stub):
    name = "tasks/" + "x" * 1_000_000
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetTask(task_pb2.GetTaskRequest(name=name))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert len(info.value.details()) < 2048
    assert len(rich_status(info.value).SerializeToString()) < 4096


async def test_watch_devices_refuses_a_huge_name_filter(limited):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as chan:
        devices = device_pb2_grpc.DeviceServiceStub(chan)
        request = device_pb2.WatchDevicesRequest(names=[f"cpu:{i}" for i in range(1000)])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in devices.WatchDevices(request):
                pass
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_list_tasks_pages_are_cut_to_fit_the_message_size(server_config, start_server):
    server = await start_server(dataclasses.replace(server_config, max_message_bytes=3 * MiB))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        stub = task_pb2_grpc.TaskServiceStub(chan)
        x = np.ones(1 << 16, np.float32)  # 256 KiB out per task
        for _ in range(16):
            await stub.RunTask(task_pb2.RunTaskRequest(task=spec("exp", x)))
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            reply = await stub.ListTasks(
                task_pb2.ListTasksRequest(
                    view=task_pb2.TASK_VIEW_FULL, page_size=1000, page_token=token
                )
            )
            assert reply.ByteSize() <= 3 * MiB
            seen += [t.name for t in reply.tasks]
            pages += 1
            token = reply.next_page_token
            if not token:
                break
            assert pages < 20
        assert len(seen) == len(set(seen)) == 16
        assert pages > 1


async def test_list_workflows_pages_are_cut_to_fit_the_message_size(server_config, start_server):
    server = await start_server(dataclasses.replace(server_config, max_message_bytes=2 * MiB))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(chan)
        # 2,000 chained steps with 64-character ids: about 400 KiB per workflow, and
        # cancelled at once so that hardly any of their tasks run
        ids = [f"s{i:04d}".ljust(64, "x") for i in range(2000)]
        steps = []
        for i, step_id in enumerate(ids):
            step = orchestrator_pb2.WorkflowStep(id=step_id)
            step.task.op = "relu"
            step.task.inputs.add(ref="${inputs.x}" if i == 0 else f"${{{ids[i - 1]}.outputs[0]}}")
            steps.append(step)
        request = orchestrator_pb2.SubmitWorkflowRequest(steps=steps)
        request.inputs["x"].tensor.CopyFrom(spec("relu", np.ones(4, np.float32)).inputs[0].tensor)
        names = []
        for _ in range(6):
            wf = (await stub.SubmitWorkflow(request)).workflow
            await stub.CancelWorkflow(orchestrator_pb2.CancelWorkflowRequest(name=wf.name))
            names.append(wf.name)
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            reply = await stub.ListWorkflows(
                orchestrator_pb2.ListWorkflowsRequest(page_size=1000, page_token=token)
            )
            assert reply.ByteSize() <= 2 * MiB
            seen += [w.name for w in reply.workflows]
            pages += 1
            token = reply.next_page_token
            if not token:
                break
            assert pages < 20
        assert sorted(seen) == sorted(names)
        assert pages > 1


async def test_http_guard_statuses(server):
    base = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
    json_type = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            base, data=b"input=hi", headers={"Content-Type": "application/x-www-form-urlencoded"}
        ) as r:
            assert r.status == 415
        for body, why in [
            (b"[" * 1000 + b"]" * 1000, "deep nesting"),
            (b'{"input": ' + b"9" * 5000 + b"}", "a huge integer"),
            (b'{"input": "\\ud800"}', "a lone surrogate"),
            (b'{"input": NaN}', "NaN"),
            (b'{"input": "\xff"}', "invalid UTF-8"),
        ]:
            async with session.post(base, data=body, headers=json_type) as r:
                assert r.status == 400, why
                assert (await r.json())["error"]["code"] == "invalid_json"
        async with session.post(base, data=b" " * (33 * MiB), headers=json_type) as r:
            assert r.status == 413
        async with session.post(base, json={"model": "local", "input": "hi"}) as r:
            assert r.status == 200


async def test_unfinished_tasks_per_tenant_are_limited():
    from kernelmesh.core import devices
    from kernelmesh.core.errors import ResourceExhausted
    from kernelmesh.core.limits import TenantLedger
    from kernelmesh.core.tasks import TaskManager, TaskSpec
    from kernelmesh.core.tensor_store import TensorStore

    ledger = TenantLedger(Quotas(max_tasks_per_tenant=2))
    manager = TaskManager(devices.discover("t", ("cpu",)), TensorStore(1 << 20, ledger))
    # queues without workers (start() is not called): queued tasks stay unfinished
    for device in manager.devices:
        manager._work[device] = asyncio.Event()
    x = np.ones(4, np.float32)
    first = manager.submit(TaskSpec("exp", [x], tenant="a"))
    manager.submit(TaskSpec("exp", [x], tenant="a"))
    with pytest.raises(ResourceExhausted) as info:
        manager.submit(TaskSpec("exp", [x], tenant="a"))
    assert info.value.retry_after > 0
    manager.submit(TaskSpec("exp", [x], tenant="b"))  # a tenant of its own
    manager.cancel(first.name, tenant="a")  # a finished task frees its place
    manager.submit(TaskSpec("exp", [x], tenant="a"))
    assert ledger.tasks_of("a") == 2
    await manager.shutdown(0)
    assert ledger.tasks_of("a") == ledger.tasks_of("b") == 0
    assert ledger.total_bytes == 0


async def test_unknown_enums_deep_inside_a_request_are_found(limited):
    from kernelmesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as chan:
        orchestrator = orchestrator_pb2_grpc.OrchestratorServiceStub(chan)
        request = orchestrator_pb2.RegisterNodeRequest(address="n:1")
        request.devices.add(name="cpu:0", kind=1)
        request.devices.add(name="gpu:9", kind=41)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await orchestrator.RegisterNode(request)
        # refused by the request guard, before the RPC is reached
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "devices[1].kind" in violations(info.value)
        ok = orchestrator_pb2.RegisterNodeRequest(address="n:1")
        ok.devices.add(name="cpu:0", kind=1)
        try:
            await orchestrator.RegisterNode(ok)
        except grpc.aio.AioRpcError as exc:  # the RPC's own checks (name, version) may refuse it
            assert not any("kind" in v for v in violations(exc)), exc.details()


async def test_kept_outputs_move_from_the_task_to_the_tensor_store(stub, limited):
    # 400 KB in + 400 KB out held while it runs; counting the stored output on top
    # of that would pass the 1 MiB quota
    x = np.ones(100_000, np.float32)
    msg = spec("exp", x)
    msg.keep_outputs = True
    task = (await stub.RunTask(task_pb2.RunTaskRequest(task=msg))).task
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED
    # afterwards the tenant holds exactly the stored output, nothing for the task
    assert limited.ledger.bytes_of("default") == task.output_refs[0].size_bytes == 400_000
    assert limited.ledger.tasks_of("default") == 0


# --- Durations: the proto's own range, and a sane maximum per field --------

_DAY = 86_400
_BAD_DURATIONS = [
    ((2**62, 0), "far past the field's maximum"),
    ((315_576_000_001, 0), "past Duration's range"),
    ((1, -5), "nanos of the other sign"),
    ((-1, 5), "nanos of the other sign, negative"),
    ((0, 2_000_000_000), "nanos past a second"),
    ((-5, 0), "negative"),
]


def _duration(target, seconds: int, nanos: int) -> None:
    target.seconds, target.nanos = seconds, nanos


@pytest.mark.parametrize("field", ["initial_interval", "maximum_interval"])
@pytest.mark.parametrize(("value", "why"), _BAD_DURATIONS, ids=[w for _, w in _BAD_DURATIONS])
async def test_out_of_range_retry_intervals_are_invalid_argument(stub, field, value, why):
    msg = spec("exp", np.ones(4, np.float32))
    _duration(getattr(msg.retry_policy, field), *value)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitTask(task_pb2.SubmitTaskRequest(task=msg))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, why
    assert f"task.retry_policy.{field}" in violations(info.value), why


async def test_retry_intervals_up_to_a_day_are_accepted(stub):
    msg = spec("exp", np.ones(4, np.float32))
    _duration(msg.retry_policy.initial_interval, 1, 500_000_000)
    _duration(msg.retry_policy.maximum_interval, _DAY, 0)
    task = (await stub.SubmitTask(task_pb2.SubmitTaskRequest(task=msg))).task
    assert task.name
    _duration(msg.retry_policy.maximum_interval, _DAY, 1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitTask(task_pb2.SubmitTaskRequest(task=msg))
    assert "task.retry_policy.maximum_interval" in violations(info.value)


def _workflow(**step_fields) -> orchestrator_pb2.SubmitWorkflowRequest:
    step = orchestrator_pb2.WorkflowStep(id="a", **step_fields)
    step.task.CopyFrom(spec("exp", np.ones(4, np.float32)))
    return orchestrator_pb2.SubmitWorkflowRequest(steps=[step])


@pytest.mark.parametrize(
    ("value", "why"),
    [*_BAD_DURATIONS, ((30 * _DAY + 1, 0), "a second past 30 days")],
    ids=[w for _, w in _BAD_DURATIONS] + ["past 30 days"],
)
async def test_out_of_range_step_timeouts_are_invalid_argument(limited, value, why):
    request = _workflow()
    _duration(request.steps[0].timeout, *value)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as chan:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitWorkflow(request)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, why
        assert "steps[0].timeout" in violations(info.value), why
        # a step's own retry policy is checked the same way (every value here is
        # past its one-day maximum or invalid)
        request = _workflow()
        _duration(request.steps[0].retry_policy.initial_interval, *value)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitWorkflow(request)
        assert "steps[0].retry_policy.initial_interval" in violations(info.value), why


async def test_a_step_timeout_of_30_days_is_accepted(limited):
    request = _workflow()
    _duration(request.steps[0].timeout, 30 * _DAY, 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as chan:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(chan)
        workflow = (await stub.SubmitWorkflow(request)).workflow
        assert workflow.name


@pytest.mark.parametrize(("value", "why"), _BAD_DURATIONS, ids=[w for _, w in _BAD_DURATIONS])
async def test_out_of_range_revocation_graces_are_invalid_argument(limited, value, why):
    request = orchestrator_pb2.RevokeApiKeyRequest(name="apiKeys/x")
    _duration(request.grace, *value)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as chan:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RevokeApiKey(request)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, why
        assert "grace" in violations(info.value), why


def test_the_readmes_limits_and_quotas_are_the_defaults():
    import re
    from pathlib import Path

    import yaml

    from kernelmesh.core.ops import Limits

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S)]
    limits = [b["limits"] for b in blocks if isinstance(b, dict) and "limits" in b]
    quotas = [b["quotas"] for b in blocks if isinstance(b, dict) and "quotas" in b]
    assert limits and quotas
    for shown in limits:
        assert shown == dataclasses.asdict(Limits())
    for shown in quotas:
        defaults = dataclasses.asdict(Quotas())
        assert shown == {k: defaults[k] for k in shown}
