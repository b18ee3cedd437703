"""One page of a tenant's records, newest first: how ListTasks and
ListWorkflows read the records a server holds in memory."""

from __future__ import annotations

import base64
import math
from collections.abc import Reversible
from typing import Protocol, TypeVar

from kernelmesh.core.errors import InvalidArgument, Violation

DEFAULT_PAGE = 100
MAX_PAGE = 1000


def page_size_of(asked: int) -> int:
    """The records a page holds when `asked` for (0 or less: the default)."""
    return DEFAULT_PAGE if asked <= 0 else min(asked, MAX_PAGE)


class Listed(Protocol):
    @property
    def seq(self) -> int: ...

    @property
    def tenant(self) -> str: ...

    @property
    def state(self) -> object: ...


R = TypeVar("R", bound=Listed)


def newest_first(
    records: Reversible[R],
    *,
    tenant: str,
    state: object | None = None,
    page_size: int = 0,
    page_token: str = "",
) -> tuple[list[R], str]:
    """`records` oldest first (insertion order); returns up to a page of the
    tenant's, in `state` when given, and the token to continue below them."""
    size = page_size_of(page_size)
    below = _decode_token(page_token) if page_token else math.inf
    page: list[R] = []
    for record in reversed(records):
        if record.seq >= below or record.tenant != tenant:
            continue
        if state is not None and record.state is not state:
            continue
        if len(page) == size:
            return page, _encode_token(page[-1].seq)
        page.append(record)
    return page, ""


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"below:{seq}".encode()).decode()


def _decode_token(token: str) -> int:
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind != "below":
            raise ValueError(kind)
        return int(value)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(
            [Violation("page_token", "not a page token returned by this server")]
        ) from None
