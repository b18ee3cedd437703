"""The response cache: LRU with a TTL (cachetools.TTLCache), for deterministic
requests only (temperature 0 or a seed). The key holds the tenant, so tenants
never see each other's answers, the model, the options and a SHA-256 digest of
the messages: up to max_entries keys stay in memory, and prompts may be
megabytes long, so the key must not keep their text."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Hashable, Sequence

from cachetools import TTLCache

from kernelmesh.core.llm.config import CacheConfig
from kernelmesh.core.llm.types import Completion, GenerationOptions, Message


class ResponseCache:
    def __init__(self, config: CacheConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = config.max_entries > 0
        self._entries: TTLCache[Hashable, Completion] | None = (
            TTLCache(maxsize=config.max_entries, ttl=config.ttl_s, timer=clock)
            if self.enabled
            else None
        )

    def key(
        self,
        tenant: str,
        model: str,
        messages: Sequence[Message],
        options: GenerationOptions,
    ) -> Hashable | None:
        """The cache key, or None when the request must not be cached."""
        if self._entries is None or not options.deterministic:
            return None
        digest = hashlib.sha256()
        for message in messages:
            # Length-prefixed, so no two conversations hash the same bytes.
            content = message.content.encode("utf-8", "surrogatepass")
            digest.update(f"{message.role.value}:{len(content)}:".encode())
            digest.update(content)
        return (tenant, model, digest.digest(), options)

    def get(self, key: Hashable | None) -> Completion | None:
        if key is None or self._entries is None:
            return None
        return self._entries.get(key)

    def put(self, key: Hashable | None, completion: Completion) -> None:
        # Only complete answers are worth repeating: a response cut by an
        # error is not.
        if key is None or self._entries is None or completion.finish_reason.value == "error":
            return
        self._entries[key] = completion

    def __len__(self) -> int:
        return 0 if self._entries is None else len(self._entries)
