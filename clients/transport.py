"""The I/O under the two faces: `Transport` performs a plan's steps on a
blocking `grpc.Channel`, `AsyncTransport` on a `grpc.aio` one. This module is
the only place that knows which; each method here is the blocking or the
awaiting half of one step (`calls`), holding no request or reply logic."""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
)
from typing import Any, Generic, TypeVar, cast

import grpc
import grpc.aio
from tenacity import AsyncRetrying, Retrying

from kernelmesh.clients.calls import (
    NO_DEADLINE,
    Pages,
    Plan,
    Read,
    Req,
    Res,
    Step,
    Stream,
    T,
    Unary,
    Upload,
)
from kernelmesh.clients.errors import (
    CancelledError,
    InternalError,
    KernelmeshError,
    error_for,
    rpc_errors,
)
from kernelmesh.clients.options import ClientOptions, channel_options, retry_policy
from kernelmesh.clients.tracing import aio_interceptors, intercept

V = TypeVar("V")


class _Channel:
    """What both transports share: options, metadata, deadlines, stepping a plan."""

    channel: grpc.Channel | grpc.aio.Channel

    def __init__(self, options: ClientOptions, credentials: grpc.ChannelCredentials | None) -> None:
        self.options = options
        self.metadata = options.metadata()
        self.credentials = credentials or options.credentials()
        self.channel_options = channel_options(options)

    def deadline(self, timeout: float | None) -> float | None:
        """None: the client's default; infinity: no deadline at all."""
        if timeout is None:
            return self.options.timeout
        return None if timeout == NO_DEADLINE else timeout

    @staticmethod
    def advance(plan: Plan[T], reply: object) -> tuple[Step | None, T | None]:
        """The plan's next step after `reply`, or (None, its result) once it ends."""
        try:
            return plan.send(reply), None
        except StopIteration as done:
            return None, cast(T, done.value)

    @staticmethod
    def fail(plan: Plan[T], exc: Exception) -> tuple[Step | None, T | None]:
        """Throws a failed step's error into the plan, so a plan can clean up what it
        made (run_bulk's stored tensors); one that does not catch it re-raises it."""
        try:
            return plan.throw(exc), None
        except StopIteration as done:
            return None, cast(T, done.value)

    def opener(self, step: Stream[Req, Res, T]) -> Callable[[], Any]:
        """Starts the stream's call: a server stream, or a bidirectional one
        when the step has an iterator of requests."""
        rpc, request = step.rpc, step.request
        if isinstance(request, Iterator):
            method: Any = self.channel.stream_stream(rpc.path, rpc.serialize, rpc.deserialize)
        else:
            method = self.channel.unary_stream(rpc.path, rpc.serialize, rpc.deserialize)
        timeout = self.deadline(step.timeout)

        def start() -> Any:
            return method(
                request, timeout=timeout, metadata=self.metadata, wait_for_ready=step.wait_for_ready
            )

        return start


class _Control(Generic[T]):
    """A stream's call, opened on the first read; cancellable before or during it."""

    def __init__(self, step: Stream[Any, Any, T], open_call: Callable[[], Any]) -> None:
        self._step, self._open = step, open_call
        self._call: Any = None
        self._cancelled = False

    def cancel(self) -> None:
        """Ends the call; reading on raises CancelledError."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    def _start(self) -> Any:
        if self._cancelled:
            raise CancelledError("the stream was cancelled")
        self._call = self._open()
        return self._call


# -- blocking -------------------------------------------------------------------------


class Streaming(_Control[T], Iterator[T]):
    """A stream being read: iterate for the decoded replies; `close()` ends
    it as it would a generator."""

    _replies: Generator[T] | None = None

    def close(self) -> None:
        self.cancel()
        if self._replies is not None:
            self._replies.close()

    def __next__(self) -> T:
        if self._replies is None:
            self._replies = self._read()
        return next(self._replies)

    def _read(self) -> Generator[T]:
        call = self._start()
        try:
            with rpc_errors():
                for reply in call:
                    item = self._step.decode(reply)
                    yield item
                    if self._step.last(item):
                        return
        finally:
            call.cancel()


class Transport(_Channel):
    """Performs plans on a blocking channel."""

    channel: grpc.Channel

    def __init__(
        self, target: str, options: ClientOptions, credentials: grpc.ChannelCredentials | None
    ) -> None:
        super().__init__(options, credentials)
        if self.credentials is None:
            channel = grpc.insecure_channel(target, self.channel_options)
        else:
            channel = grpc.secure_channel(target, self.credentials, self.channel_options)
        self.channel = intercept(channel)  # traced when the application traces
        self._retrying = Retrying(**retry_policy(options))

    def close(self) -> None:
        self.channel.close()

    def run(self, plan: Plan[T]) -> T:
        step, result = self.advance(plan, None)
        while step is not None:
            try:
                reply = self._perform(step)
            except Exception as exc:
                step, result = self.fail(plan, exc)
                continue
            step, result = self.advance(plan, reply)
        return cast(T, result)

    def _perform(self, step: Step) -> object:
        if isinstance(step, Unary):
            return self.unary(step)
        if isinstance(step, Upload):
            return self._upload(step)
        if isinstance(step, Read):
            return list(self.stream(step.stream))
        return list(self.pages(step.pages))

    def unary(self, step: Unary[Req, Res]) -> Res:
        rpc = step.rpc
        method = self.channel.unary_unary(rpc.path, rpc.serialize, rpc.deserialize)
        timeout = self.deadline(step.timeout)

        def attempt() -> Res:
            with rpc_errors():
                return method(step.request, timeout=timeout, metadata=self.metadata)

        return self._retrying(attempt) if step.retry else attempt()

    def _upload(self, step: Upload[Req, Res]) -> Res:
        rpc = step.rpc
        method = self.channel.stream_unary(rpc.path, rpc.serialize, rpc.deserialize)
        with rpc_errors():
            return method(
                step.requests, timeout=self.deadline(step.timeout), metadata=self.metadata
            )

    def stream(self, step: Stream[Req, Res, T]) -> Streaming[T]:
        """The stream, opened when first read."""
        return Streaming(step, self.opener(step))

    def pages(self, pages: Pages[Req, Res, T]) -> Iterator[T]:
        """Every item of a listing, fetched a page at a time as they are read."""
        call: Unary[Req, Res] | None = pages.first()
        while call is not None:
            items, call = pages.after(self.unary(call))
            yield from items


# -- asyncio --------------------------------------------------------------------------


class AsyncStreaming(_Control[T], AsyncIterator[T]):
    """A stream being read: `async for` the decoded replies; `aclose()` ends
    it as it would an async generator."""

    _replies: AsyncGenerator[T] | None = None

    async def aclose(self) -> None:
        self.cancel()
        if self._replies is not None:
            await self._replies.aclose()

    async def __anext__(self) -> T:
        if self._replies is None:
            self._replies = self._read()
        return await anext(self._replies)

    async def _read(self) -> AsyncGenerator[T]:
        call = self._start()
        try:
            with rpc_errors():
                async for reply in call:
                    item = self._step.decode(reply)
                    yield item
                    if self._step.last(item):
                        return
        except asyncio.CancelledError:
            # grpc.aio reports a call this client cancelled as the task's own
            # cancellation; the blocking face raises CancelledError there.
            if self._cancelled:
                raise CancelledError("the stream was cancelled") from None
            raise
        finally:
            call.cancel()


# What grpc.aio reports when a write fails in Core (grpc/grpc#36066).
_CORE_INTERNAL = "Internal error from Core"


def _settled(step: Coroutine[Any, Any, V]) -> V | None:
    """A grpc.aio call accessor's value when it needs no waiting (the call has
    ended): run to its end at once; None if it would wait."""
    try:
        step.send(None)
    except StopIteration as done:
        return cast(V, done.value)
    step.close()
    return None


class _FirstStatus:
    """The error a grpc.aio call first ended with, read the moment it ended, before
    anything later can overwrite it."""

    def __init__(self, call: grpc.aio.Call) -> None:
        self.error: KernelmeshError | None = None
        call.add_done_callback(self._ended)

    def _ended(self, call: grpc.aio.Call) -> None:
        code = _settled(call.code())
        if code is None or code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            return
        metadata = _settled(call.trailing_metadata())
        pairs = cast(Iterable[tuple[str, str | bytes]], metadata or ())
        self.error = error_for(code, _settled(call.details()) or "", pairs)


class AsyncTransport(_Channel):
    """Performs plans on a grpc.aio channel."""

    channel: grpc.aio.Channel

    def __init__(
        self, target: str, options: ClientOptions, credentials: grpc.ChannelCredentials | None
    ) -> None:
        super().__init__(options, credentials)
        # Traced when the application traces (see clients/tracing.py).
        interceptors = aio_interceptors() or None
        if self.credentials is None:
            self.channel = grpc.aio.insecure_channel(
                target, self.channel_options, interceptors=interceptors
            )
        else:
            self.channel = grpc.aio.secure_channel(
                target, self.credentials, self.channel_options, interceptors=interceptors
            )
        self._retrying = AsyncRetrying(**retry_policy(options))

    async def close(self) -> None:
        await self.channel.close()

    async def run(self, plan: Plan[T]) -> T:
        step, result = self.advance(plan, None)
        while step is not None:
            try:
                reply = await self._perform(step)
            except Exception as exc:
                step, result = self.fail(plan, exc)
                continue
            step, result = self.advance(plan, reply)
        return cast(T, result)

    async def _perform(self, step: Step) -> object:
        if isinstance(step, Unary):
            return await self.unary(step)
        if isinstance(step, Upload):
            return await self._upload(step)
        if isinstance(step, Read):
            return [item async for item in self.stream(step.stream)]
        return [item async for item in self.pages(step.pages)]

    async def unary(self, step: Unary[Req, Res]) -> Res:
        rpc = step.rpc
        method = self.channel.unary_unary(rpc.path, rpc.serialize, rpc.deserialize)
        timeout = self.deadline(step.timeout)

        async def attempt() -> Res:
            with rpc_errors():
                return await method(step.request, timeout=timeout, metadata=self.metadata)

        if not step.retry:
            return await attempt()
        return cast(Res, await self._retrying(attempt))

    async def _upload(self, step: Upload[Req, Res]) -> Res:
        rpc = step.rpc
        method = self.channel.stream_unary(rpc.path, rpc.serialize, rpc.deserialize)
        call = method(step.requests, timeout=self.deadline(step.timeout), metadata=self.metadata)
        ended = _FirstStatus(call)
        try:
            with rpc_errors():
                return await call
        except InternalError as exc:
            # grpc/grpc#36066: a chunk still being sent when the server ends the call
            # (a quota refusal mid-stream) fails in Core, and grpc.aio then overwrites
            # the server's status with this one. The status the call ended with first
            # is the server's.
            if exc.message != _CORE_INTERNAL or ended.error is None:
                raise
            raise ended.error from None

    def stream(self, step: Stream[Req, Res, T]) -> AsyncStreaming[T]:
        """The stream, opened when first read."""
        return AsyncStreaming(step, self.opener(step))

    async def pages(self, pages: Pages[Req, Res, T]) -> AsyncIterator[T]:
        """Every item of a listing, fetched a page at a time as they are read."""
        call: Unary[Req, Res] | None = pages.first()
        while call is not None:
            items, call = pages.after(await self.unary(call))
            for item in items:
                yield item
