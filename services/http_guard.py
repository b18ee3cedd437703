"""Guards for the HTTP sidecar and the OpenAI facade, as aiohttp middlewares:

- `install_auth`: `Authorization: Bearer <key>` as on gRPC (probes stay open,
  /metrics on request); the key's tenant replaces whatever tenant the request
  names, so handlers need no change.
- `install`: bodies refused before a handler parses them: 413 past the size
  limit, 415 for a body that is not JSON (which also shuts out cross-site form
  posts), 400 for invalid UTF-8, nesting deeper than 64, integers past 64
  digits (the three limits are configurable), NaN/Infinity, and lone
  surrogates (which would fail later, on encoding, as a 500).

Errors use OpenAI's JSON shape, which every route of the sidecar answers with."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from kernelmesh.core.api_keys import Role
from kernelmesh.core.auth import KeyRing
from kernelmesh.core.errors import KernelmeshError

MAX_BODY_BYTES = 32 << 20
MAX_DEPTH = 64
MAX_INT_DIGITS = 64
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
OPEN_PATHS = frozenset({"/health/live", "/health/ready", "/health/startup"})
# The dashboard's data is server-wide (every tenant's LLM usage, every RPC's
# counts): with auth on, admin keys only. The page itself is static.
ADMIN_PATHS = frozenset({"/ui/snapshot", "/ui/events"})
TENANT_HEADER = "X-Kernelmesh-Tenant"


def _error(
    status: int, message: str, kind: str, code: str, param: str | None = None, **headers: str
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers or None)


class _BadJson(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _BadJson(f"{name} is not JSON")


def _check_tree(value: Any, max_depth: int) -> None:
    """Depth and lone surrogates, without recursion (the tree may be deep)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _BadJson("a string holds a lone UTF-16 surrogate") from None
            continue
        if isinstance(item, dict | list):
            if depth > max_depth:
                raise _BadJson(f"nested deeper than {max_depth} levels")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def check_json(
    body: bytes, *, max_depth: int = MAX_DEPTH, max_int_digits: int = MAX_INT_DIGITS
) -> None:
    """Raises _BadJson when `body` is not a JSON document the handlers may take."""

    def big_int(text: str) -> int:
        if len(text.lstrip("-")) > max_int_digits:
            raise _BadJson(f"an integer of {len(text)} digits; at most {max_int_digits}")
        return int(text)

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadJson("the body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_int=big_int, parse_constant=_no_constant)
    except RecursionError:
        raise _BadJson(f"nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise _BadJson(f"not valid JSON: {exc}") from None
    _check_tree(value, max_depth)


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


def install(
    app: web.Application,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_depth: int = MAX_DEPTH,
    max_int_digits: int = MAX_INT_DIGITS,
) -> None:
    """Adds the body guard to `app` (before it starts); the limits are the server
    config's `quotas:` (max_http_body_bytes, max_json_depth, max_json_int_digits)."""

    @web.middleware
    async def body_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in BODY_METHODS:
            return await handler(request)
        length = request.content_length
        if length is not None and length > max_body_bytes:
            return _too_large(max_body_bytes)
        if not _is_json(request.content_type):
            return _error(
                415,
                f"Content-Type must be application/json, got {request.content_type[:64]!r}",
                "invalid_request_error",
                "unsupported_media_type",
            )
        if max_body_bytes > MAX_BODY_BYTES:
            # the sidecar's app reads at most MAX_BODY_BYTES by itself
            request = request.clone(client_max_size=max_body_bytes)
        try:
            body = await request.read()  # aiohttp keeps it; the handler reads it again
        except web.HTTPRequestEntityTooLarge:
            return _too_large(max_body_bytes)
        if len(body) > max_body_bytes:
            return _too_large(max_body_bytes)
        try:
            check_json(body, max_depth=max_depth, max_int_digits=max_int_digits)
        except _BadJson as exc:
            return _error(400, str(exc), "invalid_request_error", "invalid_json", "body")
        return await handler(request)

    app.middlewares.append(body_guard)


def _too_large(limit: int) -> web.Response:
    return _error(
        413, f"the body is larger than {limit} bytes", "invalid_request_error", "body_too_large"
    )


def install_auth(app: web.Application, keys: KeyRing, *, protect_metrics: bool = False) -> None:
    """Adds key checks to `app`: every route but the probes (and /metrics unless
    `protect_metrics`) needs `Authorization: Bearer <key>` of a user or admin key,
    and the dashboard's data an admin key."""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in OPEN_PATHS or (path == "/metrics" and not protect_metrics):
            return await handler(request)
        try:
            principal = await keys.check(request.headers.get("Authorization"))
        except KernelmeshError as exc:
            return _error(
                401,
                exc.message,
                "authentication_error",
                "invalid_api_key",
                **{"WWW-Authenticate": "Bearer"},
            )
        if principal.role not in (Role.ADMIN, Role.USER):
            return _error(
                403,
                f"a {principal.role.value} key may not call the HTTP API",
                "permission_error",
                "permission_denied",
            )
        if path in ADMIN_PATHS and principal.role is not Role.ADMIN:
            return _error(
                403,
                f"{path} shows every tenant's usage: it needs an admin key",
                "permission_error",
                "permission_denied",
            )
        # The key decides the tenant: the handlers read it from this header, and
        # the key itself is not passed on.
        headers = request.headers.copy()
        headers.popall("Authorization", None)
        headers[TENANT_HEADER] = principal.tenant
        return await handler(request.clone(headers=headers))

    app.middlewares.append(auth)


__all__ = ["check_json", "install", "install_auth"]
