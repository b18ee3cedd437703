"""SharedMemoryRegistry's output slots: refused when too few or too small before a
task runs, and written in place once it finished (a real POSIX segment)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from multiprocessing import shared_memory

import numpy as np
import pytest

from kernelmesh.core.errors import InvalidArgument
from kernelmesh.core.shm import OutputSlot, SharedMemoryRegistry

FIELD = "task.output_shm"


@pytest.fixture
def registry() -> Iterator[SharedMemoryRegistry]:
    segment = shared_memory.SharedMemory(create=True, size=4096, name=f"km-{uuid.uuid4().hex[:12]}")
    reg = SharedMemoryRegistry()
    reg.register("t", "out", segment.name, 4096, owner_uid=os.geteuid())
    yield reg
    reg.close()
    segment.close()
    segment.unlink()


F32_2X3 = ((2, 3), np.dtype(np.float32))


def test_a_slot_per_output_that_fits_is_accepted(registry):
    registry.check_outputs(
        "t", [OutputSlot("out", 0, 24), OutputSlot("out", 24, 64)], [F32_2X3] * 2, FIELD
    )


def test_no_slots_at_all_is_accepted(registry):
    registry.check_outputs("t", [], [F32_2X3], FIELD)


def test_fewer_slots_than_outputs_are_refused(registry):
    with pytest.raises(InvalidArgument) as info:
        registry.check_outputs("t", [OutputSlot("out", 0, 24)], [F32_2X3] * 2, FIELD)
    assert [v.field for v in info.value.violations] == [FIELD]
    assert "has 1 entries; the op has 2" in info.value.violations[0].description


def test_a_slot_smaller_than_its_output_is_refused_naming_it(registry):
    with pytest.raises(InvalidArgument) as info:
        registry.check_outputs(
            "t", [OutputSlot("out", 0, 24), OutputSlot("out", 24, 23)], [F32_2X3] * 2, FIELD
        )
    assert [v.field for v in info.value.violations] == [f"{FIELD}[1].byte_size"]
    assert "needs 24 bytes" in info.value.violations[0].description


def test_another_tenants_region_is_not_found_for_this_one(registry):
    with pytest.raises(InvalidArgument) as info:
        registry.check_outputs("other", [OutputSlot("out", 0, 24)], [F32_2X3], FIELD)
    assert [v.field for v in info.value.violations] == [f"{FIELD}[0].region"]


def test_outputs_are_written_into_their_slots(registry):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, 8], dtype=np.int64)
    registry.write_outputs(
        "t", [OutputSlot("out", 0, 24), OutputSlot("out", 64, 16)], [a, b], FIELD
    )
    region = registry.get("t", "out", "region")
    np.testing.assert_array_equal(np.frombuffer(region.view(0, 24, "f"), np.float32), a.ravel())
    np.testing.assert_array_equal(np.frombuffer(region.view(64, 16, "f"), np.int64), b)
