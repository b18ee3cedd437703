"""Is anything listening at a target? The CLI asks before its first call, so a
user with no server running gets a hint within seconds, not a silent deadline."""

from __future__ import annotations

from collections.abc import Callable

import grpc

# Connected within this, the command says nothing about waiting.
QUIET_SECONDS = 0.5


class Unreachable(Exception):
    """Nothing answered at the target within the wait."""


def reach(
    target: str,
    wait: float,
    on_wait: Callable[[str], None] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Returns once an HTTP/2 connection to `target` is up (over TLS with
    `credentials`); says what it waits for (through `on_wait`) when that takes
    longer than QUIET_SECONDS; raises Unreachable, with what to do, after `wait`
    seconds."""
    channel = (
        grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    )
    ready = grpc.channel_ready_future(channel)
    try:
        try:
            ready.result(timeout=min(wait, QUIET_SECONDS))
            return
        except grpc.FutureTimeoutError:
            pass
        if on_wait is not None and wait > QUIET_SECONDS:
            on_wait(
                f"waiting for kernelmesh at {target} (up to {wait:g}s, --wait to change) ... "
                "start it with `kernelmesh serve`"
            )
        try:
            ready.result(timeout=max(wait - QUIET_SECONDS, 0.0))
        except grpc.FutureTimeoutError:
            raise Unreachable(
                f"no kernelmesh server answered at {target} within {wait:g}s. "
                "Start one with `kernelmesh serve`, or point at yours with --target HOST:PORT "
                "(or $KERNELMESH_TARGET); --wait SECONDS waits longer."
            ) from None
    finally:
        ready.cancel()
        channel.close()
