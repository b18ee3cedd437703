"""An OpenAI-compatible HTTP facade on the sidecar port, backed by the same
gateway as LLMService, so any OpenAI SDK gets the same failover, limits,
budgets and cache as a gRPC client.

    POST /v1/chat/completions   stream false: one JSON; stream true: SSE chunks
    POST /v1/embeddings         input: a string or a list of strings
    GET  /v1/models             and GET /v1/models/{model}

Tenancy: an `X-Kernelmesh-Tenant` header names the tenant; otherwise, until API
keys exist, the `Authorization: Bearer <token>` token is taken as the tenant's
name (so `OpenAI(api_key="team-a")` bills team-a); with neither, the tenant is
"default". Errors use OpenAI's JSON shape with the HTTP status Google's
gRPC-to-HTTP mapping gives the core error's code."""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import numpy as np
from aiohttp import web

from kernelmesh.core.errors import (
    Code,
    InvalidArgument,
    KernelmeshError,
    NotFound,
    ResourceExhausted,
    Violation,
)
from kernelmesh.core.llm import (
    Chunk,
    Completion,
    FinishReason,
    Gateway,
    GenerationOptions,
    Message,
    ModelInfo,
    Role,
    Usage,
)
from kernelmesh.core.tasks import DEFAULT_TENANT
from kernelmesh.services.context import check_tenant

log = logging.getLogger(__name__)

TENANT_HEADER = "X-Kernelmesh-Tenant"

# OpenAI's "developer" role is its newer name for "system".
_ROLES = {r.value: r for r in Role} | {"developer": Role.SYSTEM}
# Google's HTTP mapping of google.rpc.Code, and OpenAI's error `type` for it.
_HTTP = {
    Code.INVALID_ARGUMENT: (400, "invalid_request_error"),
    Code.FAILED_PRECONDITION: (400, "invalid_request_error"),
    Code.NOT_FOUND: (404, "invalid_request_error"),
    Code.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    Code.CANCELLED: (499, "api_error"),
    Code.INTERNAL: (500, "api_error"),
    Code.UNAVAILABLE: (503, "api_error"),
    Code.DEADLINE_EXCEEDED: (504, "api_error"),
}


def add_routes(app: web.Application, gateway: Gateway) -> None:
    """Adds the /v1 routes to the sidecar's aiohttp app."""
    facade = _Facade(gateway)
    app.router.add_post("/v1/chat/completions", facade.chat_completions)
    app.router.add_post("/v1/embeddings", facade.embeddings)
    app.router.add_get("/v1/models", facade.list_models)
    # Model names may contain "/" (e.g. "meta-llama/Llama-3.1-8B").
    app.router.add_get("/v1/models/{model:.+}", facade.get_model)


# -- errors ------------------------------------------------------------------


def _json_field(field: str) -> str:
    """Core names request fields as the gRPC messages do ("options.top_p",
    "inputs"); an HTTP caller knows them by their JSON names."""
    if field.startswith("options."):
        return field.removeprefix("options.")
    return "input" + field.removeprefix("inputs") if field.startswith("inputs") else field


def error_body(exc: KernelmeshError) -> dict[str, Any]:
    _, kind = _HTTP.get(exc.code, (500, "api_error"))
    violations = exc.violations if isinstance(exc, InvalidArgument) else []
    fields = [_json_field(v.field) for v in violations]
    message = (
        "; ".join(f"{f}: {v.description}" for f, v in zip(fields, violations, strict=True))
        if violations
        else exc.message
    )
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": fields[0] if fields else None,
            "code": exc.reason.lower(),
        }
    }


def error_response(exc: KernelmeshError) -> web.Response:
    status, _ = _HTTP.get(exc.code, (500, "api_error"))
    headers = {}
    if isinstance(exc, ResourceExhausted):
        # Retry-After is whole seconds (RFC 9110); the openai SDK reads the
        # finer retry-after-ms first.
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        headers["retry-after-ms"] = str(max(1, round(exc.retry_after * 1000)))
    return web.json_response(error_body(exc), status=status, headers=headers)


def _client_left(response: web.StreamResponse) -> web.StreamResponse:
    """A client that closed its connection mid-stream is not an error of ours
    (aiohttp raises ClientConnectionResetError, a ConnectionResetError, on the
    next write)."""
    log.debug("the client closed a chat completion stream before its end")
    return response


def _openai_errors(handler: Callable[[_Facade, web.Request], Awaitable[web.StreamResponse]]):
    """Core errors become OpenAI error JSON; anything unexpected a logged 500."""

    @functools.wraps(handler)
    async def wrapper(self: _Facade, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(self, request)
        except KernelmeshError as exc:
            return error_response(exc)
        except Exception:
            log.exception("internal error in %s %s", request.method, request.path)
            return error_response(KernelmeshError("internal error; the server logged the details"))

    return wrapper


# -- request parsing -----------------------------------------------------------


def tenant_of(request: web.Request) -> str:
    explicit = request.headers.get(TENANT_HEADER)
    if explicit is not None:
        return check_tenant(explicit, f"header {TENANT_HEADER}")
    auth = request.headers.get("Authorization", "").strip()
    if not auth:
        return DEFAULT_TENANT
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer":
        raise InvalidArgument([Violation("header Authorization", "expected 'Bearer <key>'")])
    token = token.strip()
    return check_tenant(token, "header Authorization") if token else DEFAULT_TENANT


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument([Violation("body", f"not valid JSON: {exc}")]) from None
    if not isinstance(body, dict):
        raise InvalidArgument([Violation("body", "expected a JSON object")])
    return body


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _content(value: object, field: str, violations: list[Violation]) -> str:
    """A message's content: a string, null, or a list of text parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:
                violations.append(Violation(f"{field}[{j}].type", "only text parts are supported"))
        return "".join(texts)
    violations.append(Violation(field, "expected a string or a list of text parts"))
    return ""


def parse_chat(body: dict[str, Any]) -> tuple[str, list[Message], GenerationOptions]:
    """The model, messages and options of a chat completion request; every
    problem is reported at once, each naming its JSON field."""
    violations: list[Violation] = []
    model = body.get("model")
    if not isinstance(model, str):
        violations.append(Violation("model", "required: a model name (see GET /v1/models)"))
        model = ""
    messages: list[Message] = []
    raw = body.get("messages")
    if not isinstance(raw, list):
        violations.append(Violation("messages", "required: a list of {role, content}"))
        raw = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            violations.append(Violation(f"messages[{i}]", "expected an object"))
            continue
        name = item.get("role")
        role = _ROLES.get(name) if isinstance(name, str) else None
        if role is None:
            violations.append(
                Violation(f"messages[{i}].role", f"must be one of {', '.join(_ROLES)}")
            )
            continue
        messages.append(
            Message(role, _content(item.get("content"), f"messages[{i}].content", violations))
        )

    def number(name: str) -> float | None:
        value = body.get(name)
        if value is None or _is_number(value):
            return value
        violations.append(Violation(name, "expected a number"))
        return None

    temperature, top_p = number("temperature"), number("top_p")
    # max_completion_tokens is OpenAI's newer name for max_tokens.
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and not _is_int(max_tokens):
        violations.append(Violation("max_tokens", "expected an integer"))
        max_tokens = None
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        violations.append(Violation("seed", "expected an integer"))
        seed = None
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    elif stop is None:
        stop = []
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        violations.append(Violation("stop", "expected a string or a list of strings"))
        stop = []
    if body.get("n", 1) not in (1, None):
        violations.append(Violation("n", "only n=1 is supported"))
    if not isinstance(body.get("stream", False), bool):
        violations.append(Violation("stream", "expected true or false"))
    if violations:
        raise InvalidArgument(violations)
    options = GenerationOptions(
        temperature=None if temperature is None else float(temperature),
        top_p=None if top_p is None else float(top_p),
        max_tokens=max_tokens or 0,
        stop=tuple(stop),
        seed=seed,
    )
    return model, messages, options


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


# -- response shapes -------------------------------------------------------------


def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _finish(reason: FinishReason) -> str:
    return reason.value


def _served_by(provider: str, deployment: str, cached: bool) -> dict[str, str]:
    """Which deployment answered, in headers, so the JSON stays OpenAI's shape."""
    return {
        "X-Kernelmesh-Provider": provider,
        "X-Kernelmesh-Deployment": deployment,
        "X-Kernelmesh-Cache": "hit" if cached else "miss",
    }


def completion_json(c: Completion, model: str, ident: str, created: int) -> dict[str, Any]:
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": _finish(c.finish_reason),
                "logprobs": None,
            }
        ],
        "usage": usage_json(c.usage),
        "system_fingerprint": None,
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class _ChunkWriter:
    """Builds OpenAI's chat.completion.chunk events for one stream."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }
        self.include_usage = include_usage
        self.first = True

    def events(self, chunk: Chunk) -> bytes:
        out = b""
        if chunk.delta or self.first:
            delta: dict[str, str] = {"content": chunk.delta}
            if self.first:
                delta = {"role": "assistant", **delta}
                self.first = False
            out += self._event(delta, None)
        if chunk.finish_reason is not None:
            out += self._event({}, _finish(chunk.finish_reason))
        if chunk.usage is not None and self.include_usage:
            # OpenAI's usage chunk: after the finish, with no choices.
            out += _sse({**self.base, "choices": [], "usage": usage_json(chunk.usage)})
        return out

    def _event(self, delta: dict[str, str], finish: str | None) -> bytes:
        payload = {
            **self.base,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if self.include_usage:
            payload["usage"] = None  # every chunk but the last, as OpenAI sends it
        return _sse(payload)


def model_json(m: ModelInfo) -> dict[str, Any]:
    return {
        "id": m.name,
        "object": "model",
        "created": 0,
        "owned_by": "kernelmesh",
        # Extensions; OpenAI SDKs keep unknown fields.
        "kind": m.kind,
        "deployments": [
            {
                "name": d.name,
                "provider": d.provider,
                "healthy": d.healthy,
                "breaker": d.breaker.value,
                "unhealthy_reason": d.reason,
            }
            for d in m.deployments
        ],
    }


# -- handlers --------------------------------------------------------------------


class _Facade:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @_openai_errors
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        tenant = tenant_of(request)
        body = await _json_object(request)
        model, messages, options = parse_chat(body)
        if body.get("stream"):
            return await self._stream(request, tenant, model, messages, options, body)
        completion = await self.gateway.generate(tenant, model, messages, options)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        return web.json_response(
            completion_json(completion, model, ident, int(time.time())),
            headers=_served_by(completion.provider, completion.deployment, completion.cached),
        )

    async def _stream(
        self,
        request: web.Request,
        tenant: str,
        model: str,
        messages: list[Message],
        options: GenerationOptions,
        body: dict[str, Any],
    ) -> web.StreamResponse:
        chunks = self.gateway.stream(tenant, model, messages, options)
        # aclosing: a client that disconnects (aiohttp cancels the handler)
        # closes the gateway's generator, and with it the upstream request.
        async with aclosing(chunks):
            # Wait for the first chunk before sending headers: failures before
            # the first token (limits, no deployment left) get a real HTTP
            # status, and the headers can name the deployment that answered.
            first = await anext(chunks, None)
            headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            if first is not None:
                headers |= _served_by(first.provider, first.deployment, first.cached)
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            writer = _ChunkWriter(model, _include_usage(body))
            try:
                if first is not None:
                    await response.write(writer.events(first))
                async for chunk in chunks:
                    await response.write(writer.events(chunk))
            except ConnectionResetError:
                return _client_left(response)  # aclosing closes the upstream
            except Exception as exc:
                # Headers are gone, so the status cannot change: OpenAI's
                # in-stream error event (the openai SDK raises APIError on it),
                # and no [DONE], so no client mistakes this for a full answer.
                if not isinstance(exc, KernelmeshError):
                    log.exception("internal error in a chat completion stream")
                    exc = KernelmeshError("internal error; the server logged the details")
                try:
                    await response.write(_sse(error_body(exc)))
                except ConnectionResetError:
                    return _client_left(response)
                return response
            try:
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
            except ConnectionResetError:
                # A client may close as soon as it has the last token, before
                # [DONE]: it has its whole answer; nothing went wrong.
                return _client_left(response)
            return response

    @_openai_errors
    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        tenant = tenant_of(request)
        body = await _json_object(request)
        model, inputs, encoding = _parse_embeddings(body)
        result = await self.gateway.embed(tenant, model, inputs)
        data = []
        for index, vector in enumerate(result.vectors):
            value: object = vector
            if encoding == "base64":
                value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": model or result.deployment,
                "usage": {
                    "prompt_tokens": result.usage.prompt_tokens,
                    "total_tokens": result.usage.total_tokens,
                },
            },
            headers=_served_by(result.provider, result.deployment, False),
        )

    @_openai_errors
    async def list_models(self, request: web.Request) -> web.StreamResponse:
        tenant_of(request)  # a malformed tenant is refused here too
        return web.json_response(
            {"object": "list", "data": [model_json(m) for m in self.gateway.models()]}
        )

    @_openai_errors
    async def get_model(self, request: web.Request) -> web.StreamResponse:
        tenant_of(request)
        name = request.match_info["model"]
        for m in self.gateway.models():
            if m.name == name:
                return web.json_response(model_json(m))
        raise NotFound(f"model {name!r} is not configured (see GET /v1/models)")


def _parse_embeddings(body: dict[str, Any]) -> tuple[str, list[str], str]:
    violations: list[Violation] = []
    model = body.get("model", "")
    if not isinstance(model, str):
        violations.append(Violation("model", "expected a model name"))
        model = ""
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        inputs = list(raw)
    else:
        violations.append(
            Violation(
                "input", "expected a string or a list of strings (token arrays are not supported)"
            )
        )
        inputs = []
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        violations.append(Violation("encoding_format", "expected 'float' or 'base64'"))
    if body.get("dimensions") is not None:
        violations.append(Violation("dimensions", "not supported: models have fixed dimensions"))
    if violations:
        raise InvalidArgument(violations)
    return model, inputs, encoding


__all__ = ["TENANT_HEADER", "add_routes", "error_body", "parse_chat", "tenant_of"]
