"""The Cython ReadyQueue against a plain Python reference of the same
behaviour: property tests run both side by side, and specification tests pin
one behaviour each.

`ReferenceReadyQueue` defines the order; benchmarks/bench_queue.py imports it
as the fair pure-Python baseline.
"""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from kernelmesh.native._dispatch import ReadyQueue


class ReferenceReadyQueue:
    """Strict priority between levels; within a level, a ring of the tenants
    that have live tasks there (a tenant joins the tail with its first live
    task and leaves when it has none); FIFO per tenant per level."""

    def __init__(self) -> None:
        # priority -> (ring of tenants, tenant -> its task ids oldest first)
        self._levels: dict[int, tuple[deque[str], dict[str, deque[int]]]] = {}
        self._where: dict[int, tuple[int, str]] = {}

    def push(self, task_id: int, tenant: str, priority: int) -> None:
        if task_id in self._where:
            raise ValueError(f"task {task_id} is already queued")
        ring, tasks = self._levels.setdefault(priority, (deque(), {}))
        if tenant not in tasks:
            tasks[tenant] = deque()
            ring.append(tenant)
        tasks[tenant].append(task_id)
        self._where[task_id] = (priority, tenant)

    def pop(self) -> int:
        if not self._where:
            raise IndexError("pop from an empty ReadyQueue")
        priority = max(self._levels)
        ring, tasks = self._levels[priority]
        tenant = ring.popleft()
        task_id = tasks[tenant].popleft()
        if tasks[tenant]:
            ring.append(tenant)
        else:
            del tasks[tenant]
        if not ring:
            del self._levels[priority]
        del self._where[task_id]
        return task_id

    def remove(self, task_id: int) -> bool:
        if task_id not in self._where:
            return False
        priority, tenant = self._where.pop(task_id)
        ring, tasks = self._levels[priority]
        tasks[tenant].remove(task_id)
        if not tasks[tenant]:
            del tasks[tenant]
            ring.remove(tenant)
        if not ring:
            del self._levels[priority]
        return True

    def drain(self) -> list[int]:
        out = []
        while self._where:
            out.append(self.pop())
        return out

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, task_id: object) -> bool:
        return isinstance(task_id, int) and task_id in self._where

    def depth_by_tenant(self) -> dict[str, int]:
        depth: dict[str, int] = {}
        for _, tenant in self._where.values():
            depth[tenant] = depth.get(tenant, 0) + 1
        return depth


@pytest.fixture(params=[ReadyQueue, ReferenceReadyQueue], ids=["cython", "reference"])
def make_queue(request: pytest.FixtureRequest) -> type:
    """The specification tests run against both, so the reference is checked
    by the same examples that define the behaviour."""
    return request.param


# -- property tests: the Cython queue and the reference in lockstep ----------

TENANTS = st.sampled_from("abcde")
# Mostly a few levels (the usual case), sometimes many (so that empty levels
# pile up past what the queue keeps for reuse) and the C int extremes.
PRIORITIES = st.one_of(
    st.integers(min_value=-2, max_value=2),
    st.integers(min_value=-30, max_value=30),
    st.sampled_from([-(2**31), 2**31 - 1]),
)


class QueueMachine(RuleBasedStateMachine):
    queued = Bundle("queued")

    def __init__(self) -> None:
        super().__init__()
        self.real = ReadyQueue()
        self.ref = ReferenceReadyQueue()
        self.next_id = 0
        self.seen: list[int] = []

    def _fresh_id(self) -> int:
        # Spread over the whole signed 64-bit range, not only small ints.
        self.next_id += 1
        task_id = (self.next_id * 0xD6E8FEB86659FD93) % 2**64 - 2**63
        self.seen.append(task_id)
        return task_id

    @initialize()
    def start(self) -> None:
        assert len(self.real) == 0

    @rule(target=queued, tenant=TENANTS, priority=PRIORITIES)
    def push(self, tenant: str, priority: int) -> int:
        task_id = self._fresh_id()
        self.real.push(task_id, tenant, priority)
        self.ref.push(task_id, tenant, priority)
        return task_id

    @rule(task_id=queued, tenant=TENANTS, priority=PRIORITIES)
    def push_duplicate(self, task_id: int, tenant: str, priority: int) -> None:
        is_queued = task_id in self.ref
        for q in (self.real, self.ref):
            if is_queued:
                with pytest.raises(ValueError):
                    q.push(task_id, tenant, priority)
            else:  # popped or removed earlier: the id may be reused
                q.push(task_id, tenant, priority)

    @rule()
    def pop(self) -> None:
        if len(self.ref):
            assert self.real.pop() == self.ref.pop()
        else:
            with pytest.raises(IndexError):
                self.real.pop()

    @rule(task_id=consumes(queued))
    def remove_known(self, task_id: int) -> None:
        assert self.real.remove(task_id) == self.ref.remove(task_id)

    @rule(task_id=st.integers(min_value=-(2**63), max_value=2**63 - 1))
    def remove_any(self, task_id: int) -> None:
        assert self.real.remove(task_id) == self.ref.remove(task_id)

    @rule(task_id=queued)
    def remove_twice(self, task_id: int) -> None:
        assert self.real.remove(task_id) == self.ref.remove(task_id)
        assert self.real.remove(task_id) is False
        assert self.ref.remove(task_id) is False

    @rule()
    def drain(self) -> None:
        assert self.real.drain() == self.ref.drain()

    @invariant()
    def same_state(self) -> None:
        assert len(self.real) == len(self.ref)
        assert self.real.depth_by_tenant() == self.ref.depth_by_tenant()
        for task_id in self.seen[-20:]:
            assert (task_id in self.real) == (task_id in self.ref)


QueueMachine.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestQueueMachine = QueueMachine.TestCase


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("push"), TENANTS, PRIORITIES),
        st.tuples(st.just("pop")),
        st.tuples(st.just("remove"), st.integers(min_value=0, max_value=400)),
    ),
    max_size=400,
)


@settings(max_examples=300, deadline=None)
@given(ops=OPS, finish=st.sampled_from(["pop", "drain"]))
def test_long_op_sequences_match_reference(ops: list[tuple], finish: str) -> None:
    """Longer runs than the state machine reaches, deep queues included,
    ending by emptying the queue with pop or with drain."""
    real, ref = ReadyQueue(), ReferenceReadyQueue()
    next_id = 0
    for op in ops:
        if op[0] == "push":
            real.push(next_id, op[1], op[2])
            ref.push(next_id, op[1], op[2])
            next_id += 1
        elif op[0] == "pop":
            if len(ref):
                assert real.pop() == ref.pop()
        else:
            assert real.remove(op[1]) == ref.remove(op[1])
        assert len(real) == len(ref)
    assert real.depth_by_tenant() == ref.depth_by_tenant()
    if finish == "drain":
        assert real.drain() == ref.drain()
    else:
        assert [real.pop() for _ in range(len(real))] == ref.drain()
    assert len(real) == 0
    assert real.depth_by_tenant() == {}


# -- specification tests ------------------------------------------------------


def test_higher_priority_pops_first(make_queue: type) -> None:
    q = make_queue()
    q.push(1, "a", 0)
    q.push(2, "a", 5)
    q.push(3, "a", -3)
    q.push(4, "b", 1)
    assert [q.pop() for _ in range(4)] == [2, 4, 1, 3]


def test_lower_priority_waits_while_higher_has_work(make_queue: type) -> None:
    q = make_queue()
    q.push(1, "low", 0)
    q.push(2, "high", 1)
    assert q.pop() == 2
    q.push(3, "high", 1)  # arrives later but still outranks the waiting task
    assert q.pop() == 3
    assert q.pop() == 1


def test_fifo_within_a_tenant(make_queue: type) -> None:
    q = make_queue()
    for task_id in (7, 3, 9, 1):
        q.push(task_id, "a", 0)
    assert [q.pop() for _ in range(4)] == [7, 3, 9, 1]


def test_round_robin_across_tenants(make_queue: type) -> None:
    q = make_queue()
    for task_id in range(1, 4):
        q.push(task_id, "a", 0)
    for task_id in range(11, 14):
        q.push(task_id, "b", 0)
    q.push(21, "c", 0)
    assert q.drain() == [1, 11, 21, 2, 12, 3, 13]


def test_busy_tenant_does_not_starve_a_small_one(make_queue: type) -> None:
    q = make_queue()
    for task_id in range(100):
        q.push(task_id, "busy", 0)
    q.push(1000, "small", 0)
    assert [q.pop() for _ in range(2)] == [0, 1000]


def test_late_tenant_joins_the_tail_of_the_ring(make_queue: type) -> None:
    q = make_queue()
    q.push(1, "a", 0)
    q.push(2, "a", 0)
    q.push(3, "b", 0)
    assert q.pop() == 1  # ring is now b, a
    q.push(4, "c", 0)  # c joins behind a
    assert q.drain() == [3, 2, 4]


def test_round_robin_is_per_priority_level(make_queue: type) -> None:
    q = make_queue()
    q.push(1, "a", 1)
    q.push(2, "b", 0)
    q.push(3, "a", 0)
    # At level 0, b joined the ring before a.
    assert q.drain() == [1, 2, 3]


def test_tenant_that_empties_rejoins_at_the_tail(make_queue: type) -> None:
    q = make_queue()
    q.push(1, "a", 0)
    q.push(2, "b", 0)
    q.push(3, "b", 0)
    assert q.pop() == 1  # a has nothing left and leaves the ring
    q.push(4, "a", 0)  # so it comes back behind b: ring b, a
    # b pops and goes back behind a, so a's new task comes before b's second.
    assert q.drain() == [2, 4, 3]


def test_remove_takes_out_only_that_task(make_queue: type) -> None:
    q = make_queue()
    for task_id in (1, 2, 3):
        q.push(task_id, "a", 0)
    assert q.remove(2) is True
    assert 2 not in q
    assert len(q) == 2
    assert q.drain() == [1, 3]


def test_remove_unknown_or_twice_is_false(make_queue: type) -> None:
    q = make_queue()
    assert q.remove(1) is False
    q.push(1, "a", 0)
    assert q.remove(1) is True
    assert q.remove(1) is False
    q.push(2, "a", 0)
    assert q.pop() == 2
    assert q.remove(2) is False


def test_removing_a_tenants_last_task_drops_it_from_the_ring(make_queue: type) -> None:
    q = make_queue()
    q.push(1, "a", 0)
    q.push(2, "b", 0)
    q.push(3, "c", 0)
    assert q.remove(1) is True  # a leaves the ring: b, c
    q.push(4, "a", 0)  # and rejoins at the tail: b, c, a
    assert q.drain() == [2, 3, 4]


def test_removing_one_of_several_keeps_the_tenants_place(make_queue: type) -> None:
    q = make_queue()
    q.push(1, "a", 0)
    q.push(2, "b", 0)
    q.push(3, "a", 0)
    assert q.remove(1) is True  # a still has task 3, so stays at the head
    assert q.drain() == [3, 2]


def test_removing_the_last_task_of_a_level_falls_through(make_queue: type) -> None:
    q = make_queue()
    q.push(1, "a", 9)
    q.push(2, "a", 0)
    assert q.remove(1) is True
    assert q.pop() == 2
    assert len(q) == 0


def test_removed_id_can_be_pushed_again(make_queue: type) -> None:
    q = make_queue()
    q.push(1, "a", 0)
    q.push(2, "b", 0)
    assert q.remove(1) is True
    q.push(1, "c", 3)
    assert q.drain() == [1, 2]


def test_pop_on_empty_raises_index_error(make_queue: type) -> None:
    q = make_queue()
    with pytest.raises(IndexError, match="pop from an empty ReadyQueue"):
        q.pop()
    q.push(1, "a", 0)
    q.pop()
    with pytest.raises(IndexError, match="pop from an empty ReadyQueue"):
        q.pop()


def test_duplicate_push_raises_value_error(make_queue: type) -> None:
    q = make_queue()
    q.push(1, "a", 0)
    with pytest.raises(ValueError, match="already queued"):
        q.push(1, "b", 7)
    # The failed push changed nothing.
    assert len(q) == 1
    assert q.depth_by_tenant() == {"a": 1}
    assert q.drain() == [1]


def test_drain_returns_pop_order_and_empties(make_queue: type) -> None:
    q, ref = make_queue(), make_queue()
    pushes = [(i, "abc"[i % 3], i % 4 - 1) for i in range(30)]
    for args in pushes:
        q.push(*args)
        ref.push(*args)
    expected = [ref.pop() for _ in range(30)]
    assert q.drain() == expected
    assert len(q) == 0
    assert q.drain() == []
    assert q.depth_by_tenant() == {}


def test_queue_is_reusable_after_drain(make_queue: type) -> None:
    q = make_queue()
    q.push(1, "a", 0)
    q.push(2, "b", 1)
    q.drain()
    q.push(2, "a", 0)
    q.push(3, "b", 0)
    assert 2 in q
    assert q.drain() == [2, 3]


@pytest.mark.parametrize("empty_by", ["pop", "remove", "drain"])
def test_reusable_after_a_large_burst_empties(make_queue: type, empty_by: str) -> None:
    # Past a few thousand tasks an emptied queue gives its memory back; it
    # must work the same afterwards.
    q = make_queue()
    for task_id in range(10_000):
        q.push(task_id, "ab"[task_id % 2], task_id % 3)
    if empty_by == "pop":
        for _ in range(10_000):
            q.pop()
    elif empty_by == "remove":
        for task_id in range(10_000):
            assert q.remove(task_id) is True
    else:
        assert len(q.drain()) == 10_000
    assert len(q) == 0
    assert 5 not in q
    q.push(5, "b", 0)
    q.push(6, "a", 1)
    q.push(7, "a", 0)
    assert q.depth_by_tenant() == {"a": 2, "b": 1}
    assert q.drain() == [6, 5, 7]


def test_len_contains_and_depth_by_tenant(make_queue: type) -> None:
    q = make_queue()
    assert len(q) == 0
    assert q.depth_by_tenant() == {}
    q.push(1, "a", 0)
    q.push(2, "a", 1)
    q.push(3, "b", 0)
    assert len(q) == 3
    assert 1 in q
    assert 4 not in q
    assert q.depth_by_tenant() == {"a": 2, "b": 1}
    q.remove(3)
    assert q.depth_by_tenant() == {"a": 2}  # tenants with none are omitted


def test_contains_non_int_is_false(make_queue: type) -> None:
    q = make_queue()
    q.push(1, "a", 0)
    assert "1" not in q
    assert None not in q
    assert 2**80 not in q
    assert -(2**80) not in q


def test_large_ids(make_queue: type) -> None:
    q = make_queue()
    ids = [2**62, 2**62 + 1, 2**63 - 1, -(2**63), -(2**62), 0]
    for i, task_id in enumerate(ids):
        q.push(task_id, "t", i % 2)
    assert all(task_id in q for task_id in ids)
    assert q.remove(2**62 + 1) is True
    assert q.drain() == [-(2**63), 0, 2**62, 2**63 - 1, -(2**62)]


def test_ids_outside_64_bits_are_rejected() -> None:
    q = ReadyQueue()
    with pytest.raises(OverflowError):
        q.push(2**63, "a", 0)
    with pytest.raises(OverflowError):
        q.push(1, "a", 2**31)  # priority is a C int
    with pytest.raises(TypeError):
        q.push(1, None, 0)
    with pytest.raises(TypeError):
        q.push(1, b"a", 0)
    assert len(q) == 0


def test_levels_emptied_in_every_order() -> None:
    # Levels empty by pop (from the top) and by remove (below the top), with
    # new work arriving above, below and between; far more levels than the
    # queue keeps empty for reuse.
    real, ref = ReadyQueue(), ReferenceReadyQueue()
    next_id = 0
    for round_ in range(30):
        for level in range(0, 60, 1 + round_ % 7):
            for q in (real, ref):
                q.push(next_id, "ab"[level % 2], (level * 37 + round_) % 61 - 30)
            next_id += 1
        for task_id in range(next_id - 1, -1, -(2 + round_ % 5)):
            assert real.remove(task_id) == ref.remove(task_id)
        for _ in range(min(len(ref), 5 + round_)):
            assert real.pop() == ref.pop()
        assert len(real) == len(ref)
        assert real.depth_by_tenant() == ref.depth_by_tenant()
    assert real.drain() == ref.drain()


def test_many_priorities_and_tenants() -> None:
    real, ref = ReadyQueue(), ReferenceReadyQueue()
    for task_id in range(5000):
        args = (task_id, f"tenant-{task_id * 7 % 97}", task_id * 13 % 41 - 20)
        real.push(*args)
        ref.push(*args)
    for task_id in range(0, 5000, 3):
        assert real.remove(task_id) == ref.remove(task_id)
    assert real.depth_by_tenant() == ref.depth_by_tenant()
    assert real.drain() == ref.drain()
