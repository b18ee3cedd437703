"""The vocabulary of the request layer, with no I/O in it (sans-IO).

A request *plan* (see `plans`) is a generator: it yields *steps* (a unary
call, an upload, a stream to read, a listing to page through), receives each
step's reply, and returns the decoded result. A transport (`transport`) drives
a plan, blocking or under asyncio; the two faces differ only in that driver,
so building requests, decoding replies, paging and error mapping are written
once."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from google.protobuf.message import Message

Req = TypeVar("Req", bound=Message)
Res = TypeVar("Res", bound=Message)
T = TypeVar("T")

# A stream's timeout for "no deadline"; None means "the client's default".
NO_DEADLINE = math.inf


@dataclass(frozen=True)
class Rpc(Generic[Req, Res]):
    """One method of the contract: its path and its message types."""

    path: str
    request: type[Req]
    response: type[Res]

    def serialize(self, request: Req | bytes) -> bytes:
        # bytes: a request encoded already (UploadTensor's chunks, tensors.py)
        if isinstance(request, bytes):
            return request
        return request.SerializeToString()

    def deserialize(self, data: bytes) -> Res:
        return self.response.FromString(data)


def rpc(service: str, method: str, request: type[Req], response: type[Res]) -> Rpc[Req, Res]:
    return Rpc(f"/kernelmesh.v1.{service}/{method}", request, response)


@dataclass(frozen=True)
class Unary(Generic[Req, Res]):
    """A unary call; retried on UNAVAILABLE when `retry`."""

    rpc: Rpc[Req, Res]
    request: Req
    timeout: float | None = None
    retry: bool = True


@dataclass(frozen=True)
class Upload(Generic[Req, Res]):
    """A client-streaming call (never retried: its requests are read once)."""

    rpc: Rpc[Req, Res]
    requests: Iterator[Req | bytes]
    timeout: float | None = None


@dataclass(frozen=True)
class Stream(Generic[Req, Res, T]):
    """A server stream (one request) or a bidirectional one (an iterator of
    requests); each reply is decoded into a T. With `until`, the stream ends
    (and the call is cancelled) after the first item `until` accepts."""

    rpc: Rpc[Req, Res]
    request: Req | Iterator[Req]
    decode: Callable[[Res], T]
    timeout: float | None = None
    wait_for_ready: bool = False
    until: Callable[[T], bool] | None = None

    def last(self, item: T) -> bool:
        return self.until is not None and self.until(item)


@dataclass(frozen=True)
class Read(Generic[T]):
    """Reads a whole stream into a list."""

    stream: Stream[Any, Any, T]


@dataclass(frozen=True)
class Pages(Generic[Req, Res, T]):
    """A List call paged by token (AIP-158): `request(token)` builds a page's
    request, `items(reply)` decodes its items and says the next token."""

    rpc: Rpc[Req, Res]
    request: Callable[[str], Req]
    items: Callable[[Res], tuple[Iterable[T], str]]

    def first(self) -> Unary[Req, Res]:
        return Unary(self.rpc, self.request(""))

    def after(self, reply: Res) -> tuple[Iterable[T], Unary[Req, Res] | None]:
        """A page's items, and the call for the next page (None after the last)."""
        items, token = self.items(reply)
        return items, Unary(self.rpc, self.request(token)) if token else None


# Every List response carries it (AIP-158); protobuf's Message type does not say so.
_NEXT_PAGE_TOKEN = "next_page_token"


def listing(
    rpc: Rpc[Req, Res], items: Callable[[Res], Iterable[T]], page_size: int, **filters: object
) -> Pages[Req, Res, T]:
    """A List call's pages: `page_size` items a page, the same `filters` on each,
    `items` decoding a page's replies."""

    def request(token: str) -> Req:
        return rpc.request(page_size=page_size, page_token=token, **filters)

    def page(reply: Res) -> tuple[Iterable[T], str]:
        return items(reply), str(getattr(reply, _NEXT_PAGE_TOKEN))

    return Pages(rpc, request, page)


@dataclass(frozen=True)
class ReadAll(Generic[T]):
    """Every page of a listing, as a list."""

    pages: Pages[Any, Any, T]


Step: TypeAlias = Unary[Any, Any] | Upload[Any, Any] | Read[Any] | ReadAll[Any]
Plan: TypeAlias = Generator[Step, Any, T]


def call(
    rpc: Rpc[Req, Res], request: Req, timeout: float | None = None, *, retry: bool = True
) -> Plan[Res]:
    reply = yield Unary(rpc, request, timeout, retry)
    return _checked(rpc, reply)


def upload(
    rpc: Rpc[Req, Res], requests: Iterator[Req | bytes], timeout: float | None = None
) -> Plan[Res]:
    reply = yield Upload(rpc, requests, timeout)
    return _checked(rpc, reply)


def read(stream: Stream[Any, Any, T]) -> Plan[list[T]]:
    items: list[T] = yield Read(stream)
    return items


def read_all(pages: Pages[Any, Any, T]) -> Plan[list[T]]:
    items: list[T] = yield ReadAll(pages)
    return items


def _checked(rpc: Rpc[Any, Res], reply: object) -> Res:
    if not isinstance(reply, rpc.response):
        raise TypeError(f"{rpc.path} answered {type(reply).__name__}")
    return reply
