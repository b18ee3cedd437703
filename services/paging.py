"""AIP-158 pagination over an in-memory list: opaque `offset:N` page tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from kernelmesh.core.errors import InvalidArgument, Violation
from kernelmesh.core.listing import page_size_of

T = TypeVar("T")


def page_bounds(token: str, page_size: int, total: int) -> tuple[int, int]:
    """(start, size) of the page a request asks for; page_size 0 means the default."""
    size = page_size_of(page_size)
    if not token:
        return 0, size
    kind, _, value = token.partition(":")
    if kind != "offset" or not value.isdigit() or int(value) > total:
        raise InvalidArgument([Violation("page_token", "not a page token returned by this server")])
    return int(value), size


def next_token(start: int, size: int, total: int) -> str:
    """The token of the page after [start, start + size), or "" at the end."""
    return f"offset:{start + size}" if start + size < total else ""


def page_of(items: Sequence[T], token: str, page_size: int) -> tuple[Sequence[T], str]:
    """The page of `items` a List request asks for, and the token of the next one."""
    start, size = page_bounds(token, page_size, len(items))
    return items[start : start + size], next_token(start, size, len(items))
