"""Small builders shared by the service tests."""

from __future__ import annotations

import grpc
import numpy as np
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2

from kernelmesh.clients import tensors
from kernelmesh.v1 import task_pb2


def spec(op: str, *arrays: np.ndarray, **params: object) -> task_pb2.TaskSpec:
    msg = task_pb2.TaskSpec(op=op)
    for a in arrays:
        msg.inputs.add(tensor=tensors.to_proto(a))
    if params:
        struct = struct_pb2.Struct()
        struct.update(params)
        msg.params.CopyFrom(struct)
    return msg


def output(task: task_pb2.Task) -> np.ndarray:
    return tensors.from_proto(task.outputs[0])


def rich_status(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no rich status on {err.code()}: {err.details()}")


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    found: dict[str, str] = {}
    for detail in rich_status(err).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found
