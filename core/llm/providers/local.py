"""The offline embedding model: WordLlama's static token embeddings
(MIT-licensed, 32k tokens x 256 dims, 16 MB) shipped inside the `wordllama`
wheel. We read its safetensors and tokenizer files directly instead of going
through WordLlama.load: that path imports huggingface-hub and can fall back
to downloading, while reading two local files provably touches no network.

An embedding is the mean of the text's token vectors, L2-normalised, exactly
what WordLlama's own embed(norm=True) computes."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import numpy as np

from kernelmesh.core.llm.config import ProviderKind
from kernelmesh.core.llm.providers.base import FailureKind, Provider
from kernelmesh.core.llm.types import (
    Chunk,
    Completion,
    Embeddings,
    GenerationOptions,
    Message,
    Usage,
)

_WEIGHTS = "weights/l2_supercat_256.safetensors"
_TOKENIZER = "tokenizers/l2_supercat_tokenizer_config.json"
_TENSOR = "embedding.weight"
# Texts embedded per matrix operation; bounds the padded batch's memory.
_BATCH = 64


def _package_dir() -> Path:
    # find_spec locates the package without importing it (its __init__
    # pulls in pydantic and huggingface-hub, which we do not need).
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the local embedding model needs the `wordllama` package: pip install wordllama"
        )
    return Path(next(iter(spec.submodule_search_locations)))


class WordLlamaEmbedder:
    """Loaded once, on first use, in a worker thread."""

    def __init__(self, package_dir: Path | None = None) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        root = package_dir or _package_dir()
        self.table: np.ndarray = np.ascontiguousarray(
            load_file(str(root / _WEIGHTS))[_TENSOR], dtype=np.float32
        )
        self.tokenizer = Tokenizer.from_file(str(root / _TOKENIZER))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.dimensions = int(self.table.shape[1])

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """Returns (unit vectors, one row per text) and the token count."""
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        tokens = 0
        top = self.table.shape[0] - 1
        for start in range(0, len(texts), _BATCH):
            batch = list(texts[start : start + _BATCH])
            for row, encoding in enumerate(
                self.tokenizer.encode_batch(batch, add_special_tokens=False), start
            ):
                ids = np.clip(np.asarray(encoding.ids, dtype=np.int64), 0, top)
                tokens += len(ids)
                out[row] = self.table[ids].mean(axis=0) if len(ids) else 0.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        # A text with no tokens (only whitespace) stays the zero vector.
        np.divide(out, norms, out=out, where=norms > 0)
        return out, tokens


_shared: WordLlamaEmbedder | None = None
_shared_lock = threading.Lock()


def shared_embedder() -> WordLlamaEmbedder:
    """One copy per process, however many gateways (tests start many)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = WordLlamaEmbedder()
        return _shared


class LocalProvider(Provider):
    kind = ProviderKind.LOCAL

    async def generate(self, messages: Sequence[Message], options: GenerationOptions) -> Completion:
        raise self._error(FailureKind.BAD_REQUEST, "the local provider serves embeddings only")

    async def stream(
        self, messages: Sequence[Message], options: GenerationOptions
    ) -> AsyncGenerator[Chunk, None]:
        raise self._error(FailureKind.BAD_REQUEST, "the local provider serves embeddings only")
        yield  # type: ignore[unreachable]  # pragma: no cover - makes this an async generator

    async def embed(self, inputs: Sequence[str]) -> Embeddings:
        # Loading (~0.3 s) and embedding are CPU work: keep them off the loop.
        try:
            vectors, tokens = await asyncio.to_thread(_embed, list(inputs))
        except (OSError, ImportError) as e:
            raise self._error(
                FailureKind.MISCONFIGURED, f"cannot load the local embedding model: {e}"
            ) from e
        return Embeddings(vectors, Usage(tokens, 0, tokens), self.provider, self.name)


def _embed(texts: list[str]) -> tuple[list[list[float]], int]:
    vectors, tokens = shared_embedder().embed(texts)
    return vectors.tolist(), tokens
