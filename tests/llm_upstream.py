"""A fake LLM upstream for tests and benchmarks: an aiohttp server on
127.0.0.1 (ephemeral port) speaking the OpenAI wire protocol
(/v1/chat/completions as JSON and SSE with a usage chunk, /v1/embeddings,
/v1/models) and Ollama's (/api/chat as JSON and NDJSON, /api/embed).

Replies are deterministic: the words of "echo <last user message>", one word
per token and per stream chunk, cut at max_tokens (finish reason "length").
Prompt tokens are the words of all messages.

Faults, switchable at any time (also from another thread):
    fail_with(status, times=n, retry_after=None)  the next n API requests answer `status`
    stall(seconds, model=None)                     wait before answering (0 to stop); only
                                                   requests for `model` when given
    count_prompt_by("chars")                       prompt tokens one per character (as a
                                                   tokenizer for CJK text may); "words" again
    over_report(tokens)                            add `tokens` to every reported prompt count
    slow_stream(seconds)                           wait between stream chunks
    break_stream_after(n, times=None)              streams drop the connection after n chunks
    down() / await up()                            refuse connections (and cut open ones)
                                                   (up_threadsafe() from sync code)
    reset()                                        clear every fault
Observations: requests (API requests received), paths, disconnects (clients
that went away before the answer was complete), last_body, last_headers.

In async tests:
    async with Upstream() as upstream:
        upstream.openai_url   # http://127.0.0.1:PORT/v1
        upstream.ollama_url   # http://127.0.0.1:PORT
From sync code (the OpenAI SDK test, benchmarks):
    upstream, base_url = Upstream.start_in_thread()   # base_url is the OpenAI one (…/v1)
    ...
    upstream.stop()
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import time
from collections import Counter
from typing import Any

from aiohttp import web

EMBEDDING_DIMENSIONS = 8
# Typed request keys exist from aiohttp 3.11; older versions take a string.
_GONE: Any = web.RequestKey("gone", bool) if hasattr(web, "RequestKey") else "gone"


class Upstream:
    def __init__(self, *, reply: str | None = None, model: str = "fake-model") -> None:
        # A fixed reply instead of the echo.
        self.reply = reply
        self.model = model
        self.requests = 0
        self.paths: Counter[str] = Counter()
        self.disconnects = 0
        self.last_body: dict[str, Any] | None = None
        self.last_headers: dict[str, str] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Future[None] | None = None
        self.reset()

    # -- faults --------------------------------------------------------------

    def reset(self) -> None:
        self._fail_status = 0
        self._fail_times = 0
        self._fail_retry_after: float | None = None
        self._stall_s = 0.0
        self._stall_model: str | None = None
        self._count_by = "words"
        self._extra_prompt_tokens = 0
        self._chunk_delay_s = 0.0
        self._break_after: int | None = None
        self._break_times: int | None = None
        self._down = False

    def fail_with(self, status: int, times: int = 1, retry_after: float | None = None) -> None:
        self._fail_status = status
        self._fail_times = times
        self._fail_retry_after = retry_after

    def stall(self, seconds: float, model: str | None = None) -> None:
        self._stall_s = seconds
        self._stall_model = model

    def count_prompt_by(self, unit: str) -> None:
        if unit not in ("words", "chars"):
            raise ValueError(f"count_prompt_by: 'words' or 'chars', not {unit!r}")
        self._count_by = unit

    def over_report(self, extra_prompt_tokens: int) -> None:
        """Reports more prompt tokens than any tokenizer would count: an
        upstream whose template or accounting adds tokens the caller never sent."""
        self._extra_prompt_tokens = extra_prompt_tokens

    def slow_stream(self, seconds_per_chunk: float) -> None:
        self._chunk_delay_s = seconds_per_chunk

    def break_stream_after(self, n_chunks: int | None, times: int | None = None) -> None:
        """Streams drop the connection after n_chunks; only the next `times`
        streams when given, else every one until reset (None stops it)."""
        self._break_after = n_chunks
        self._break_times = times

    def down(self) -> None:
        """Stops listening (new connections are refused) and makes open
        keep-alive connections drop their next request."""
        self._down = True
        if self._site is not None:
            site, self._site = self._site, None
            if self._loop is not None and self._loop is not _running_loop():
                asyncio.run_coroutine_threadsafe(site.stop(), self._loop).result(5)
            else:
                # Called from a coroutine on the server's own loop: stop the
                # listener on the next turn; the _down flag already cuts
                # every request that still arrives.
                self._stopping = asyncio.ensure_future(site.stop())

    async def up(self) -> None:
        if self._stopping is not None:
            await self._stopping
            self._stopping = None
        self._down = False
        if self._site is None and self._runner is not None:
            self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
            await self._site.start()

    def up_threadsafe(self) -> None:
        """up() for a server started with start_in_thread, from sync code."""
        if self._loop is None:
            raise RuntimeError("the upstream was never started")
        asyncio.run_coroutine_threadsafe(self.up(), self._loop).result(5)

    # -- lifecycle -----------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def ollama_url(self) -> str:
        return self.url

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._openai_chat)
        app.router.add_post("/v1/embeddings", self._openai_embeddings)
        app.router.add_get("/v1/models", self._openai_models)
        app.router.add_post("/api/chat", self._ollama_chat)
        app.router.add_post("/api/embed", self._ollama_embed)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", 0, reuse_address=True)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def __aenter__(self) -> Upstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @classmethod
    def start_in_thread(cls, **kwargs: Any) -> tuple[Upstream, str]:
        """Runs the server on its own event loop in a daemon thread; returns
        it and its OpenAI base URL (…/v1)."""
        upstream = cls(**kwargs)
        ready = threading.Event()
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(upstream.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(upstream.close())
            loop.close()

        upstream._thread = threading.Thread(target=run, name="llm-upstream", daemon=True)
        upstream._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake upstream did not start")
        return upstream, upstream.openai_url

    def stop(self) -> None:
        """Stops a server started with start_in_thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    # -- request handling ----------------------------------------------------

    async def _begin(self, request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        """Counts the request and applies faults; returns the body and, when
        a fault answers instead, that answer."""
        if self._down:
            _drop(request)
            raise ConnectionResetError("upstream is down")
        self.requests += 1
        self.paths[request.path] += 1
        body = await request.json()
        self.last_body = body
        self.last_headers = dict(request.headers)
        if self._stall_s and self._stall_model in (None, body.get("model")):
            await self._wait(request, self._stall_s)
        if self._fail_times > 0:
            self._fail_times -= 1
            headers = {}
            if self._fail_retry_after is not None:
                headers["Retry-After"] = f"{self._fail_retry_after:g}"
            message = f"injected failure {self._fail_status}"
            payload: Any = (
                {"error": message}
                if request.path.startswith("/api/")
                else {"error": {"message": message, "type": "fake", "code": self._fail_status}}
            )
            return body, web.json_response(payload, status=self._fail_status, headers=headers)
        return body, None

    def _gone(self, request: web.Request) -> None:
        """Counts a client that went away, once per request."""
        if not request.get(_GONE):
            request[_GONE] = True
            self.disconnects += 1

    async def _wait(self, request: web.Request, seconds: float) -> None:
        """Sleeps, noticing a client that disconnects meanwhile."""
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if request.transport is None or request.transport.is_closing():
                    self._gone(request)
                    raise ConnectionResetError("client went away")
                await asyncio.sleep(min(0.005, max(0.0, deadline - time.monotonic())))
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client disconnects.
            self._gone(request)
            raise

    def _completion(self, body: dict[str, Any], max_tokens: int | None) -> tuple[list[str], str]:
        messages = body.get("messages") or []
        last_user = next(
            (m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), ""
        )
        words = (self.reply if self.reply is not None else f"echo {last_user}").split()
        tokens = [w if i == 0 else f" {w}" for i, w in enumerate(words)]
        if max_tokens and len(tokens) > max_tokens:
            return tokens[:max_tokens], "length"
        return tokens, "stop"

    def _prompt_tokens(self, body: dict[str, Any]) -> int:
        texts = [str(m.get("content", "")) for m in body.get("messages") or []]
        if self._count_by == "chars":
            counted = sum(len(t) for t in texts)
        else:
            counted = sum(len(t.split()) for t in texts)
        return counted + self._extra_prompt_tokens

    async def _stream(
        self, request: web.Request, content_type: str, events: list[bytes], tail: list[bytes]
    ) -> web.StreamResponse:
        """Writes `events` (one per token) then `tail`, applying the stream
        faults; a client that goes away is counted."""
        break_after = self._break_after
        if self._break_times is not None:
            self._break_times -= 1
            if self._break_times <= 0:
                self._break_after = self._break_times = None
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        try:
            for i, event in enumerate(events):
                if break_after is not None and i >= break_after:
                    _drop(request)
                    return response
                if self._chunk_delay_s and i:
                    await self._wait(request, self._chunk_delay_s)
                await response.write(event)
            for event in tail:
                await response.write(event)
            await response.write_eof()
        except ConnectionError:
            self._gone(request)
        except asyncio.CancelledError:
            self._gone(request)
            raise
        return response

    # -- OpenAI ----------------------------------------------------------------

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        if fault is not None:
            return fault
        tokens, finish = self._completion(body, body.get("max_tokens"))
        usage = {
            "prompt_tokens": self._prompt_tokens(body),
            "completion_tokens": len(tokens),
            "total_tokens": self._prompt_tokens(body) + len(tokens),
        }
        created = int(time.time())
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": body.get("model", self.model),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(tokens)},
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage,
                }
            )

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            data = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.get("model", self.model),
                "choices": choices,
                **extra,
            }
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        events = [
            event(
                [{"index": 0, "delta": {"role": "assistant", "content": t}, "finish_reason": None}]
            )
            for t in tokens
        ]
        tail = [event([{"index": 0, "delta": {}, "finish_reason": finish}])]
        if (body.get("stream_options") or {}).get("include_usage"):
            tail.append(event([], usage=usage))
        tail.append(b"data: [DONE]\n\n")
        return await self._stream(request, "text/event-stream", events, tail)

    async def _openai_embeddings(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        if fault is not None:
            return fault
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        tokens = sum(len(str(text).split()) for text in inputs)
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": _vector(str(text))}
                    for i, text in enumerate(inputs)
                ],
                "model": body.get("model", self.model),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _openai_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "fake"}]}
        )

    # -- Ollama ----------------------------------------------------------------

    async def _ollama_chat(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        if fault is not None:
            return fault
        options = body.get("options") or {}
        tokens, finish = self._completion(body, options.get("num_predict"))
        model = body.get("model", self.model)
        final = {
            "model": model,
            "created_at": "2024-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": finish,
            "prompt_eval_count": self._prompt_tokens(body),
            "eval_count": len(tokens),
        }
        if not body.get("stream", True):
            final["message"]["content"] = "".join(tokens)
            return web.json_response(final)
        events = [
            json.dumps(
                {
                    "model": model,
                    "created_at": "2024-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": t},
                    "done": False,
                }
            ).encode()
            + b"\n"
            for t in tokens
        ]
        return await self._stream(
            request, "application/x-ndjson", events, [json.dumps(final).encode() + b"\n"]
        )

    async def _ollama_embed(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        if fault is not None:
            return fault
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        return web.json_response(
            {
                "model": body.get("model", self.model),
                "embeddings": [_vector(str(text)) for text in inputs],
                "prompt_eval_count": sum(len(str(text).split()) for text in inputs),
            }
        )


def _drop(request: web.Request) -> None:
    """Cuts the connection without finishing the response: what a crashed
    upstream looks like to the client."""
    if request.transport is not None:
        request.transport.abort()


def _vector(text: str) -> list[float]:
    """A deterministic unit vector per text."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b - 127.5 for b in digest[:EMBEDDING_DIMENSIONS]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
