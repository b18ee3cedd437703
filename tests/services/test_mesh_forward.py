"""The forwarder's wire form of an input: the caller's bytes as they came, or, for
an array that is not a plain view of them, what convert.fill_tensor writes."""

from __future__ import annotations

import numpy as np
import pytest

from kernelmesh.services import convert
from kernelmesh.services.mesh_forward import _fill_input
from kernelmesh.v1 import tensor_pb2

DATA = np.arange(12, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    "array",
    [
        np.frombuffer(DATA, np.float32).reshape(3, 4),  # decoded from a request
        np.frombuffer(DATA, np.float32)[2:6],  # a slice: fewer bytes than its buffer
        np.frombuffer(DATA, np.float32).reshape(3, 4).T,  # not C-contiguous
        np.frombuffer(np.arange(4, dtype=">f4").tobytes(), ">f4"),  # big-endian
        np.arange(5, dtype=np.int64),  # a computed array, no bytes under it
    ],
    ids=["decoded", "slice", "transposed", "big-endian", "computed"],
)
def test_an_input_goes_out_as_fill_tensor_would_write_it(array):
    forwarded, expected = tensor_pb2.Tensor(), tensor_pb2.Tensor()
    _fill_input(forwarded, array)
    convert.fill_tensor(expected, array)
    assert forwarded == expected
    decoded = np.frombuffer(forwarded.data, np.float32 if array.dtype.kind == "f" else np.int64)
    np.testing.assert_array_equal(decoded.reshape(tuple(forwarded.shape)), array)
