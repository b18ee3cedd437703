"""Tensors (and tensor names) as one blob: a JSON header, then each array's
raw little-endian C-order bytes, the same layout as on the wire."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

import numpy as np

_LEN = struct.Struct("<I")


def encode(items: Sequence[np.ndarray | str]) -> bytes:
    header: list[dict[str, object]] = []
    chunks: list[bytes] = []
    for item in items:
        if isinstance(item, str):
            header.append({"ref": item})
            continue
        array = np.ascontiguousarray(item)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        data = array.tobytes()
        header.append({"dtype": array.dtype.name, "shape": list(array.shape), "n": len(data)})
        chunks.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_LEN.pack(len(head)), head, *chunks])


def decode(blob: bytes) -> list[np.ndarray | str]:
    (size,) = _LEN.unpack_from(blob)
    header = json.loads(blob[_LEN.size : _LEN.size + size])
    offset = _LEN.size + size
    items: list[np.ndarray | str] = []
    for entry in header:
        if "ref" in entry:
            items.append(entry["ref"])
            continue
        n = entry["n"]
        array = np.frombuffer(blob[offset : offset + n], dtype=entry["dtype"])
        items.append(array.reshape(entry["shape"]))
        offset += n
    return items
