"""What every provider is: one deployment's upstream, spoken over one shared
aiohttp session, failing only with UpstreamError so the gateway can decide
between retry, failover and giving up without knowing HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any

import aiohttp

from kernelmesh.core.llm.config import DeploymentConfig, ProviderKind
from kernelmesh.core.llm.types import (
    Chunk,
    Completion,
    Embeddings,
    FinishReason,
    GenerationOptions,
    Message,
)


class FailureKind(Enum):
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    # 5xx
    SERVER = "server"
    # 429
    RATE_LIMITED = "rate_limited"
    # A malformed answer or a stream that ended without its terminator.
    PROTOCOL = "protocol"
    # 400, 413, 422...: the request itself is wrong; another deployment would
    # refuse it too, so neither retry nor failover.
    BAD_REQUEST = "bad_request"
    # 401, 403, 404 or a missing API key: this deployment is misconfigured
    # (key, permissions, upstream model id), another one may well work, so
    # fail over without retrying.
    MISCONFIGURED = "misconfigured"


_RETRYABLE = {
    FailureKind.TIMEOUT,
    FailureKind.CONNECTION,
    FailureKind.SERVER,
    FailureKind.RATE_LIMITED,
    FailureKind.PROTOCOL,
}


class UpstreamError(Exception):
    def __init__(
        self,
        deployment: str,
        kind: FailureKind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.deployment = deployment
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.kind in _RETRYABLE

    def __str__(self) -> str:
        status = f"HTTP {self.status}: " if self.status is not None else ""
        return f"{status}{self.message}"


_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "content_filter": FinishReason.CONTENT_FILTER,
}


def finish_reason(value: str | None) -> FinishReason:
    """Upstream finish reasons we do not model (tool_calls, Ollama's load...)
    read as STOP: the text is complete."""
    return _FINISH_REASONS.get(value or "stop", FinishReason.STOP)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Provider(ABC):
    kind: ProviderKind

    def __init__(self, deployment: DeploymentConfig) -> None:
        self.deployment = deployment
        self.name = deployment.name
        self.provider = self.kind.value
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str, str] = {}
        # The variable named by api_key_env when it is not set: read once, at
        # construction, so the gateway reports it at start (a process's
        # environment does not change under it).
        self.missing_key: str | None = None
        if deployment.api_key_env:
            key = os.environ.get(deployment.api_key_env)
            if key:
                self._headers["Authorization"] = f"Bearer {key}"
            else:
                self.missing_key = deployment.api_key_env
        # The whole request is bounded by the gateway (the deployment's window,
        # cut to the caller's deadline); only connecting has its own limit.
        self._unary_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=deployment.connect_timeout_s
        )
        # A stream may legitimately run for minutes; what must not happen is a
        # long silence between two chunks.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=deployment.connect_timeout_s,
            sock_read=deployment.timeout_s,
        )

    @property
    def unusable(self) -> str | None:
        """Why no request can succeed here whatever the upstream does, or None."""
        if self.missing_key is not None:
            return f"environment variable {self.missing_key} (api_key_env) is not set"
        return None

    def bind(self, session: aiohttp.ClientSession) -> None:
        """Attaches the gateway's shared session."""
        self._session = session

    def max_tokens(self, options: GenerationOptions) -> int:
        return options.max_tokens or self.deployment.default_max_tokens

    @staticmethod
    def sampling(options: GenerationOptions) -> dict[str, Any]:
        """The sampling options the caller set, under the names OpenAI and Ollama share;
        unset ones are left out so the upstream's defaults apply."""
        chosen: dict[str, Any] = {}
        if options.temperature is not None:
            chosen["temperature"] = options.temperature
        if options.top_p is not None:
            chosen["top_p"] = options.top_p
        if options.stop:
            chosen["stop"] = list(options.stop)
        if options.seed is not None:
            chosen["seed"] = options.seed
        return chosen

    @abstractmethod
    async def generate(
        self, messages: Sequence[Message], options: GenerationOptions
    ) -> Completion: ...

    @abstractmethod
    def stream(
        self, messages: Sequence[Message], options: GenerationOptions
    ) -> AsyncGenerator[Chunk, None]:
        """Yields non-empty deltas, then one last chunk with an empty delta,
        the finish reason and usage. Raises UpstreamError when the stream
        breaks, never ends early without saying so."""

    @abstractmethod
    async def embed(self, inputs: Sequence[str]) -> Embeddings: ...

    # -- HTTP helpers shared by the HTTP providers ---------------------------

    def _url(self, path: str) -> str:
        return self.deployment.base_url.rstrip("/") + path

    def _error(self, kind: FailureKind, message: str, **kw: Any) -> UpstreamError:
        return UpstreamError(self.name, kind, message, **kw)

    def _check_ready(self) -> aiohttp.ClientSession:
        unusable = self.unusable
        if unusable is not None:
            raise self._error(FailureKind.MISCONFIGURED, unusable)
        if self._session is None:
            raise RuntimeError("the gateway was not started: call `await gateway.start()`")
        return self._session

    def _translate(self, e: BaseException, what: str) -> UpstreamError:
        """Maps aiohttp's exceptions to the failure kinds. Never called with
        CancelledError, which must propagate as is."""
        if isinstance(e, UpstreamError):
            return e
        if isinstance(e, aiohttp.ConnectionTimeoutError):
            return self._error(
                FailureKind.TIMEOUT,
                f"{what}: could not connect within {self.deployment.connect_timeout_s}s",
            )
        if isinstance(e, TimeoutError):
            return self._error(
                FailureKind.TIMEOUT, f"{what}: silent for {self.deployment.timeout_s}s"
            )
        if isinstance(e, aiohttp.ClientPayloadError | aiohttp.ClientConnectionError):
            return self._error(FailureKind.CONNECTION, f"{what}: {type(e).__name__}: {e}")
        return self._error(FailureKind.PROTOCOL, f"{what}: {type(e).__name__}: {e}")

    async def _status_error(self, resp: aiohttp.ClientResponse) -> UpstreamError:
        try:
            body = await resp.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            body = ""
        message = _error_message(body) or resp.reason or "no message"
        status = resp.status
        if status == 429:
            kind = FailureKind.RATE_LIMITED
        elif status >= 500 or status == 408:
            kind = FailureKind.SERVER
        elif status in (401, 403, 404):
            kind = FailureKind.MISCONFIGURED
        else:
            kind = FailureKind.BAD_REQUEST
        return self._error(
            kind,
            message,
            status=status,
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
        )

    async def _post_json(self, path: str, payload: dict[str, Any]) -> Any:
        session = self._check_ready()
        try:
            async with session.post(
                self._url(path), json=payload, headers=self._headers, timeout=self._unary_timeout
            ) as resp:
                if resp.status >= 400:
                    raise await self._status_error(resp)
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError, UpstreamError) as e:
            raise self._translate(e, f"POST {path}") from e

    async def _open_stream(self, path: str, payload: dict[str, Any]) -> aiohttp.ClientResponse:
        """Sends a streaming request; the caller owns (and must close) the response."""
        session = self._check_ready()
        try:
            resp = await session.post(
                self._url(path), json=payload, headers=self._headers, timeout=self._stream_timeout
            )
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._translate(e, f"POST {path}") from e
        if resp.status >= 400:
            try:
                raise await self._status_error(resp)
            finally:
                resp.release()
        return resp


# Longer lines than this (no newline in 1 MiB) are not an event stream.
_MAX_LINE = 1 << 20


async def read_lines(content: aiohttp.StreamReader) -> AsyncGenerator[bytes, None]:
    """A response body's lines (without the newline), as they arrive; use it
    under contextlib.aclosing.

    A task reads the body as soon as bytes come, whatever the consumer is
    doing: aiohttp's reader drops the bytes it holds once the connection
    fails, so reading only when the consumer asks would lose the tokens an
    upstream sent just before a reset. Here every line received before a
    failure is yielded before the failure is raised."""
    received: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            while data := await content.readany():
                received.put_nowait(data)
        except RuntimeError as e:
            # aiohttp's word for reading a connection already closed
            received.put_nowait(aiohttp.ClientPayloadError(str(e)))
        except Exception as e:  # handed to the consumer, after the lines before it
            received.put_nowait(e)
        else:
            received.put_nowait(None)

    task = asyncio.get_running_loop().create_task(pump())
    pending = b""
    try:
        while (item := await received.get()) is not None:
            if isinstance(item, Exception):
                raise item
            pending += item
            if b"\n" in item:
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line
            if len(pending) > _MAX_LINE:
                raise ValueError(f"no end of line in {_MAX_LINE} bytes")
        if pending:
            yield pending
    finally:
        task.cancel()


def _error_message(body: str) -> str:
    """The message from OpenAI's {"error": {"message"}} or Ollama's
    {"error": "..."}; else the body itself, shortened."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            return str(error.get("message") or error)[:500]
        return str(error)[:500]
    return body.strip()[:500]
