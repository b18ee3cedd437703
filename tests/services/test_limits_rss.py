"""Memory of a real `kernelmesh serve` process: headers that declare huge
uploads must not make the server allocate them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import psutil
import pytest

from kernelmesh.v1 import task_pb2, task_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.e2e
MiB = 1 << 20


async def test_declared_upload_sizes_are_not_allocated(tmp_path, serve_tools):
    proc = serve_tools.start_serve(tmp_path, "--no-warmup")
    try:
        rss = psutil.Process(proc.process.pid)
        async with grpc.aio.insecure_channel(proc.target) as chan:
            stub = task_pb2_grpc.TaskServiceStub(chan)
            await chan.channel_ready()
            before = rss.memory_info().rss
            # 16 streams, each declaring the most one tensor may hold (2**26
            # float64, 512 MiB): 8 GiB if the server believed the headers.
            header = task_pb2.UploadTensorRequest(
                header=task_pb2.TensorHeader(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[1 << 26])
            )
            calls = [stub.UploadTensor() for _ in range(16)]
            for call in calls:
                await call.write(header)
                await call.write(task_pb2.UploadTensorRequest(chunk=b"\0" * (64 << 10)))
            peak = before
            for _ in range(20):  # a bounded look while every stream stays open
                peak = max(peak, rss.memory_info().rss)
                await asyncio.sleep(0.05)
            for call in calls:  # a second header: proof the first was taken
                await call.write(header)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert "only the first message" in info.value.details()
            peak = max(peak, rss.memory_info().rss)
        assert peak - before < 256 * MiB, f"RSS grew by {(peak - before) / MiB:.0f} MiB"
    finally:
        serve_tools.stop_serve(proc)


def test_uploads_past_the_tenant_quota_are_refused_and_not_held(tmp_path, serve_tools):
    quota = 64 * MiB
    config = tmp_path / "kernelmesh.yaml"
    config.write_text(f"quotas:\n  max_bytes_per_tenant: {quota}\n")
    proc = serve_tools.start_serve(tmp_path, "--no-warmup", "--config", str(config))
    chunk = task_pb2.UploadTensorRequest(chunk=b"\1" * MiB)
    header = task_pb2.UploadTensorRequest(
        header=task_pb2.TensorHeader(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4 * MiB])
    )

    def requests():
        yield header
        yield from [chunk] * 16

    try:
        rss = psutil.Process(proc.process.pid)
        # The synchronous stub: grpc.aio reports a client stream the server has
        # already answered as a client-side INTERNAL, hiding the server's status.
        with grpc.insecure_channel(proc.target) as chan:
            stub = task_pb2_grpc.TaskServiceStub(chan)
            grpc.channel_ready_future(chan).result(timeout=60)
            codes = []

            def upload() -> None:
                try:
                    stub.UploadTensor(requests(), timeout=60)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    codes.append(err.code())

            for _ in range(4):  # 4 tensors of 16 MiB: the whole 64 MiB quota
                upload()
            for _ in range(8):  # the refusal path once, warming the allocator for it
                upload()
            # Measured once the quota is held and a first round was refused, so the
            # allocator's slack from those does not count: what follows must hold
            # nothing more.
            held = rss.memory_info().rss
            for _ in range(8):  # 8 more (128 MiB offered), each refused
                upload()
            peak = rss.memory_info().rss
        assert codes[:4] == [grpc.StatusCode.OK] * 4
        assert set(codes[4:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert len(codes) == 20
        grown = peak - held
        assert grown < 32 * MiB, f"RSS grew by {grown / MiB:.0f} MiB over 128 MiB refused"
    finally:
        serve_tools.stop_serve(proc)


async def test_open_uploads_hold_about_the_bytes_they_are_charged(tmp_path, serve_tools):
    """150 uploads left open after one 1 MiB chunk each: the server holds each
    chunk once, in the tensor's buffer (the last message of an `async for` kept
    another copy alive while the next one was awaited)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("RSS is read from /proc, which this system lacks")
    streams, chunk_bytes = 150, MiB
    charged = streams * chunk_bytes
    proc = serve_tools.start_serve(tmp_path, "--no-warmup")
    try:
        rss = psutil.Process(proc.process.pid)
        async with grpc.aio.insecure_channel(proc.target) as chan:
            stub = task_pb2_grpc.TaskServiceStub(chan)
            await chan.channel_ready()
            # warm-up: one upload in full, so the allocator's first growth is not counted
            warm = stub.UploadTensor()
            await warm.write(_float32_header(chunk_bytes))
            await warm.write(task_pb2.UploadTensorRequest(chunk=b"\1" * chunk_bytes))
            await warm.done_writing()
            await warm
            before = rss.memory_info().rss
            header = _float32_header(chunk_bytes)  # declares exactly the one chunk
            chunk = task_pb2.UploadTensorRequest(chunk=b"\1" * chunk_bytes)
            calls = [stub.UploadTensor() for _ in range(streams)]
            for call in calls:
                await call.write(header)
                await call.write(chunk)
                # Uploads arriving 10 ms apart measure what each one holds; a burst
                # of all of them at once adds gRPC's receive buffers for a moment.
                await asyncio.sleep(0.01)
            # Bounded wait until the server has taken the chunks in (90% of them
            # resident), then the peak over a short look, every stream still open.
            grown = 0
            for _ in range(300):
                grown = rss.memory_info().rss - before
                if grown >= 0.9 * charged:
                    break
                await asyncio.sleep(0.05)
            assert grown >= 0.9 * charged, f"only {grown / MiB:.0f} MiB arrived"
            peak = grown
            for _ in range(10):
                await asyncio.sleep(0.05)
                peak = max(peak, rss.memory_info().rss - before)
            for call in calls:
                call.cancel()
        assert peak <= 1.5 * charged, (
            f"RSS grew by {peak / MiB:.0f} MiB for {charged / MiB:.0f} MiB charged"
        )
    finally:
        serve_tools.stop_serve(proc)


def _float32_header(nbytes: int) -> task_pb2.UploadTensorRequest:
    return task_pb2.UploadTensorRequest(
        header=task_pb2.TensorHeader(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[nbytes // 4])
    )
