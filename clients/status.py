"""google.rpc.Code numbers to grpc.StatusCode."""

from __future__ import annotations

import grpc

_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def code_of(value: int) -> grpc.StatusCode:
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)
