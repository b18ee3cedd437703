"""The op catalog as a server offers it: which of its devices run each op."""

from __future__ import annotations

from collections.abc import Sequence

from kernelmesh.core.devices import LocalDevice
from kernelmesh.core.ops import OpSpec


def devices_for(spec: OpSpec, devices: Sequence[LocalDevice]) -> list[str]:
    """Names of the devices that run `spec` for at least one of its dtypes, in order."""
    return [d.name for d in devices if any(d.supports(spec.name, dtype) for dtype in spec.dtypes)]


__all__ = ["devices_for"]
