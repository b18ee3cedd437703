"""TensorUpload: a tensor assembled from chunks, charged to its tenant as they arrive."""

from __future__ import annotations

import numpy as np
import pytest

from kernelmesh.core.errors import InvalidArgument, ResourceExhausted
from kernelmesh.core.limits import Quotas, TenantLedger
from kernelmesh.core.tensor_store import TensorStore
from kernelmesh.core.uploads import TensorUpload


def _upload(store: TensorStore, array: np.ndarray, tenant: str = "t") -> TensorUpload:
    return TensorUpload(
        store, tenant=tenant, dtype=array.dtype, shape=array.shape, nbytes=array.nbytes
    )


def test_chunks_become_the_stored_tensor() -> None:
    store = TensorStore(1 << 20)
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    upload = _upload(store, array)
    data = array.tobytes()
    for start in range(0, len(data), 5):
        upload.add(data[start : start + 5])
    item = upload.finish()
    np.testing.assert_array_equal(store.get(item.name, tenant="t").array, array)
    assert store.ledger.bytes_of("t") == array.nbytes


def test_a_header_alone_holds_nothing() -> None:
    store = TensorStore(1 << 20)
    _upload(store, np.zeros(1000, dtype=np.float64))
    assert store.ledger.bytes_of("t") == 0
    assert store.used_bytes == 0


def test_each_chunk_is_charged_to_the_tenant_as_it_arrives() -> None:
    store = TensorStore(1 << 20)
    upload = _upload(store, np.zeros(16, dtype=np.uint8))
    upload.add(b"\0" * 6)
    assert store.ledger.bytes_of("t") == 6
    upload.add(b"\0" * 4)
    assert store.ledger.bytes_of("t") == 10


def test_a_header_larger_than_the_store_is_refused_at_once() -> None:
    store = TensorStore(100)
    with pytest.raises(ResourceExhausted):
        _upload(store, np.zeros(101, dtype=np.uint8))


def test_more_data_than_the_header_is_refused_and_not_charged() -> None:
    store = TensorStore(1 << 20)
    upload = _upload(store, np.zeros(4, dtype=np.uint8))
    upload.add(b"abc")
    with pytest.raises(InvalidArgument) as caught:
        upload.add(b"de")
    assert [v.field for v in caught.value.violations] == ["chunk"]
    assert store.ledger.bytes_of("t") == 3


def test_a_short_upload_is_refused_at_the_end() -> None:
    store = TensorStore(1 << 20)
    upload = _upload(store, np.zeros(4, dtype=np.uint8))
    upload.add(b"abc")
    with pytest.raises(InvalidArgument, match="got 3 bytes; the header needs 4"):
        upload.finish()
    assert len(store) == 0


def test_abort_gives_back_what_the_chunks_held() -> None:
    store = TensorStore(1 << 20)
    upload = _upload(store, np.zeros(8, dtype=np.uint8))
    upload.add(b"\0" * 5)
    upload.abort()
    assert store.ledger.bytes_of("t") == 0
    assert store.ledger.total_bytes == 0


def test_the_tenant_quota_stops_an_upload_midway() -> None:
    ledger = TenantLedger(Quotas(max_bytes_per_tenant=10))
    store = TensorStore(1 << 20, ledger=ledger)
    upload = _upload(store, np.zeros(16, dtype=np.uint8))
    upload.add(b"\0" * 8)
    with pytest.raises(ResourceExhausted):
        upload.add(b"\0" * 8)
    assert ledger.bytes_of("t") == 8
    upload.abort()
    assert ledger.bytes_of("t") == 0
