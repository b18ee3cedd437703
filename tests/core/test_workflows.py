"""Workflows in core, without gRPC: validation, DAG order, parallelism,
substitution, failure handling, cancellation, durability."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from held_kernel import HeldKernel

from kernelmesh.core import devices
from kernelmesh.core.errors import Code, FailedPrecondition, InvalidArgument, NotFound
from kernelmesh.core.store.sqlite import SqliteStore
from kernelmesh.core.tasks import TaskManager, TaskManagerOptions
from kernelmesh.core.tensor_store import TensorStore
from kernelmesh.core.workflows import (
    SpecError,
    StepState,
    WorkflowEngine,
    WorkflowState,
    spec_from_dict,
)
from kernelmesh.core.workflows.spec import MAX_STEPS


async def _engine(journal=None, llm=None):
    tasks = TaskManager(
        devices.discover("test"),
        TensorStore(64 << 20),
        TaskManagerOptions(workers_per_device=2),
        journal=journal,
    )
    await tasks.start()
    if journal is not None:
        await tasks.recover()
    engine = WorkflowEngine(tasks, llm, journal=journal)
    await engine.recover()
    return tasks, engine


@pytest.fixture
async def engine():
    tasks, eng = await _engine()
    try:
        yield eng
    finally:
        await eng.shutdown()
        await tasks.shutdown(grace=2.0)


def task(op, *inputs, **params):
    return {"op": op, "inputs": list(inputs), "params": params}


async def finished(engine, spec, **kw):
    wf = await engine.submit(spec_from_dict(spec), tenant=kw.pop("tenant", "default"), **kw)
    await asyncio.wait_for(wf.wait(), 30)
    return wf


def output(engine, wf, step, index=0):
    return engine.tasks.store.get(wf.steps[step].outputs[index], tenant=wf.tenant).array


async def test_chain_substitutes_outputs_and_inputs(engine):
    x = np.arange(-3, 3, dtype=np.float32)
    wf = await finished(
        engine,
        {
            "inputs": {"x": x},
            "steps": [
                {"id": "neg", "task": task("relu", "${inputs.x}")},
                {"id": "sum", "task": task("add", "${neg.outputs[0]}", "${inputs.x}")},
            ],
        },
    )
    assert wf.state is WorkflowState.SUCCEEDED, wf.error
    np.testing.assert_allclose(output(engine, wf, "sum"), np.maximum(x, 0) + x)
    assert wf.plan.deps["sum"] == ("neg",), "a reference implies the dependency"


async def test_independent_steps_run_in_parallel_and_dependants_after(engine):
    a = np.ones((300, 300), np.float64)
    steps = [{"id": f"m{i}", "task": task("matmul", a, a)} for i in range(4)]
    steps.append(
        {
            "id": "join",
            "depends_on": [f"m{i}" for i in range(4)],
            "task": task("add", "${m0.outputs[0]}", "${m1.outputs[0]}"),
        }
    )
    wf = await finished(engine, {"steps": steps})
    assert wf.state is WorkflowState.SUCCEEDED
    runs = [wf.steps[f"m{i}"] for i in range(4)]
    # every fan-out step started before any of them ended: they ran at once
    assert max(r.start_time for r in runs) <= min(r.end_time for r in runs)
    assert wf.steps["join"].start_time >= max(r.end_time for r in runs)


async def test_failure_fails_workflow_and_cancels_the_rest(engine):
    wf = await finished(
        engine,
        {
            "steps": [
                {
                    "id": "bad",
                    "task": task("relu", np.ones(2, np.float32)),
                    "timeout": 1e-9,
                },
                {"id": "after", "task": task("relu", "${bad.outputs[0]}")},
            ]
        },
    )
    assert wf.state is WorkflowState.FAILED
    assert wf.steps["bad"].state is StepState.FAILED
    assert wf.steps["bad"].error.code == Code.DEADLINE_EXCEEDED
    assert wf.steps["after"].state is StepState.CANCELLED
    assert "bad" in wf.error.message


async def test_continue_on_failure_skips_only_dependants(engine):
    wf = await finished(
        engine,
        {
            "steps": [
                {
                    "id": "bad",
                    "task": task("relu", np.ones(2, np.float32)),
                    "timeout": 1e-9,
                    "continue_on_failure": True,
                },
                {"id": "child", "task": task("relu", "${bad.outputs[0]}")},
                {"id": "grandchild", "task": task("relu", "${child.outputs[0]}")},
                {"id": "other", "task": task("relu", np.ones(2, np.float32))},
            ]
        },
    )
    assert wf.state is WorkflowState.SUCCEEDED
    assert wf.steps["bad"].state is StepState.FAILED
    assert wf.steps["child"].state is StepState.SKIPPED
    assert wf.steps["grandchild"].state is StepState.SKIPPED
    assert wf.steps["other"].state is StepState.SUCCEEDED


def violations(exc_info) -> dict[str, str]:
    return {v.field: v.description for v in exc_info.value.violations}


async def test_validation_names_each_problem(engine):
    spec = spec_from_dict(
        {
            "steps": [
                {"id": "a", "depends_on": ["a"], "task": task("relu", np.ones(2, np.float32))},
                {"id": "b", "depends_on": ["nope"], "task": task("relu", "${ghost.outputs[0]}")},
                {"id": "c", "task": task("relu", "${inputs.missing}")},
            ]
        }
    )
    with pytest.raises(InvalidArgument) as info:
        await engine.submit(spec, tenant="default")
    found = violations(info)
    assert "itself" in found["steps[0].depends_on[0]"]
    assert "nope" in found["steps[1].depends_on[0]"]
    assert "ghost" in found["steps[1].task.inputs[0].ref"]
    assert "missing" in found["steps[2].task.inputs[0].ref"]
    assert engine.list(tenant="default")[0] == [], "nothing was recorded"


async def test_cycle_is_named(engine):
    spec = spec_from_dict(
        {
            "steps": [
                {"id": "a", "depends_on": ["c"], "task": task("relu", np.ones(2, np.float32))},
                {"id": "b", "depends_on": ["a"], "task": task("relu", np.ones(2, np.float32))},
                {"id": "c", "depends_on": ["b"], "task": task("relu", np.ones(2, np.float32))},
            ]
        }
    )
    with pytest.raises(InvalidArgument) as info:
        await engine.submit(spec, tenant="default")
    (description,) = violations(info).values()
    assert description.startswith("cycle: ")
    cycle = description.removeprefix("cycle: ").split(" -> ")
    assert cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["a", "b", "c"]


async def test_type_mismatches_found_downstream(engine):
    f32 = np.ones((2, 3), np.float32)
    f64 = np.ones((3, 2), np.float64)
    spec = spec_from_dict(
        {
            "steps": [
                {"id": "t", "task": task("transpose", f32)},
                # float32 (3, 2) from t against float64: a dtype mismatch two steps on
                {"id": "sum", "task": task("add", "${t.outputs[0]}", f64)},
                {"id": "txt", "task": task("relu", "${t.text}")},
                {"id": "idx", "task": task("relu", "${t.outputs[3]}")},
            ]
        }
    )
    with pytest.raises(InvalidArgument) as info:
        await engine.submit(spec, tenant="default")
    found = violations(info)
    assert any(k.startswith("steps[1].task.inputs") for k in found), found
    assert "tensor is needed" in found["steps[2].task.inputs[0].ref"]
    assert "1 output" in found["steps[3].task.inputs[0].ref"]


async def test_op_refused_by_every_device_is_failed_precondition(engine):
    spec = spec_from_dict(
        {
            "steps": [
                {
                    "id": "gpu",
                    "task": {**task("relu", np.ones(2, np.float32)), "device": {"kind": "metal"}},
                }
            ]
        }
    )
    if any(d.info.kind is devices.DeviceKind.METAL for d in engine.tasks.devices):
        pytest.skip("this machine has a Metal device")
    with pytest.raises(FailedPrecondition):
        await engine.submit(spec, tenant="default")


def test_too_many_steps_is_refused_before_parsing_them():
    steps = [{"id": f"s{i}"} for i in range(10_000)]
    with pytest.raises(SpecError) as info:
        spec_from_dict({"steps": steps})
    assert [v.field for v in info.value.violations] == ["steps"]
    assert str(MAX_STEPS) in info.value.violations[0].description


async def test_request_id_returns_the_first_workflow(engine):
    spec = spec_from_dict({"steps": [{"id": "a", "task": task("relu", np.ones(2, np.float32))}]})
    first = await engine.submit(spec, tenant="default", request_id="r1", fingerprint="f")
    again = await engine.submit(spec, tenant="default", request_id="r1", fingerprint="f")
    assert again is first
    with pytest.raises(InvalidArgument):
        await engine.submit(spec, tenant="default", request_id="r1", fingerprint="other")
    other = await engine.submit(spec, tenant="other", request_id="r1", fingerprint="f")
    assert other is not first


async def test_tenants_see_only_their_workflows(engine):
    spec = spec_from_dict({"steps": [{"id": "a", "task": task("relu", np.ones(2, np.float32))}]})
    wf = await engine.submit(spec, tenant="alice")
    with pytest.raises(NotFound):
        engine.get(wf.name, tenant="bob")
    assert engine.list(tenant="bob")[0] == []
    assert engine.list(tenant="alice")[0] == [wf]


async def test_list_pages_and_filters_by_state(engine):
    spec = {"steps": [{"id": "a", "task": task("relu", np.ones(2, np.float32))}]}
    made = [await finished(engine, spec) for _ in range(3)]
    page, token = engine.list(tenant="default", page_size=2)
    assert page == [made[2], made[1]] and token
    rest, token = engine.list(tenant="default", page_size=2, page_token=token)
    assert rest == [made[0]] and token == ""
    assert engine.list(tenant="default", state=WorkflowState.FAILED)[0] == []


async def test_cancel_cancels_running_steps(engine):
    a = np.ones((256, 256), np.float64)
    spec = spec_from_dict(
        {
            "inputs": {"a": a},
            "steps": [
                {"id": f"m{i}", "task": task("matmul", "${inputs.a}", "${inputs.a}")}
                for i in range(6)
            ]
            + [{"id": "after", "depends_on": ["m0"], "task": task("relu", np.ones(2, np.float32))}],
        }
    )
    # Held matmul kernels: m0 cannot end (and "after" start) before the cancel,
    # which a poll for a running step could let happen on a loaded machine.
    held = HeldKernel(engine.tasks.devices[0], "matmul")
    try:
        wf = await engine.submit(spec, tenant="default")
        await held.wait_started()
        await engine.cancel(wf.name, tenant="default")
    finally:
        held.release()
    assert wf.state is WorkflowState.CANCELLED
    assert wf.steps["after"].state is StepState.CANCELLED
    for step in wf.steps.values():
        if step.task:
            assert engine.tasks.get(step.task, tenant="default").state.terminal


async def test_watch_streams_step_transitions_with_timings(engine):
    spec = spec_from_dict(
        {
            "steps": [
                {"id": "a", "task": task("relu", np.ones(2, np.float32))},
                {"id": "b", "task": task("relu", "${a.outputs[0]}")},
            ]
        }
    )
    wf = await engine.submit(spec, tenant="default")
    events = [e async for e in engine.watch(wf.name, tenant="default")]
    assert events[-1].state is WorkflowState.SUCCEEDED and events[-1].step == ""
    ended = [e for e in events if e.step and e.step_state is StepState.SUCCEEDED]
    # a watcher that joins late sees the rest; those it sees come in order
    assert [e.step for e in ended] == [s for s in ("a", "b") if s in {e.step for e in ended}]
    assert all(e.duration is not None and e.duration >= 0 for e in ended)


async def test_resumes_from_finished_steps_after_restart(tmp_path):
    store = SqliteStore(tmp_path)
    await store.open()
    tasks, engine = await _engine(journal=store)
    x = np.arange(4, dtype=np.float32)
    spec = spec_from_dict(
        {
            "inputs": {"x": x},
            "steps": [
                {"id": "first", "task": task("relu", "${inputs.x}")},
                {"id": "second", "task": task("add", "${first.outputs[0]}", "${inputs.x}")},
            ],
        }
    )
    wf = await engine.submit(spec, tenant="default")
    await asyncio.wait_for(wf.wait(), 30)
    first_task = wf.steps["first"].task
    # Pretend the process died after "first" finished: rewrite the rows as they
    # would stand then ("second" never started, the workflow RUNNING).
    from kernelmesh.core.store.workflow_records import PutWorkflowStep, UpdateWorkflow
    from kernelmesh.core.workflows.engine import _step_record

    second = wf.steps["second"]
    second.state, second.task, second.start_time, second.end_time = (
        StepState.PENDING,
        "",
        None,
        None,
    )
    second.outputs = []
    await store.write(
        PutWorkflowStep(_step_record(wf, second)),
        UpdateWorkflow(wf.id, {"state": 1, "end_time": None}),
        wait=True,
    )
    await engine.shutdown()
    await tasks.shutdown(grace=1.0)
    await store.close()

    store = SqliteStore(tmp_path)
    await store.open()
    tasks, engine = await _engine(journal=store)
    try:
        back = engine.get(wf.name, tenant="default")
        await asyncio.wait_for(back.wait(), 30)
        assert back.state is WorkflowState.SUCCEEDED
        assert back.steps["first"].task == first_task, "the finished step did not run again"
        runs = [t for t in tasks.list(tenant="default")[0] if t.labels.get("step") == "first"]
        assert len(runs) == 1
        np.testing.assert_allclose(output(engine, back, "second"), np.maximum(x, 0) + x)
    finally:
        await engine.shutdown()
        await tasks.shutdown(grace=1.0)
        await store.close()


async def test_a_step_that_failed_before_the_crash_fails_the_resumed_workflow(tmp_path):
    from kernelmesh.core.store.workflow_records import PutWorkflowStep
    from kernelmesh.core.tasks import TaskFailure
    from kernelmesh.core.workflows.engine import _step_record

    store = SqliteStore(tmp_path)
    await store.open()
    tasks, engine = await _engine(journal=store)
    a = np.ones((800, 800), np.float64)
    spec = spec_from_dict(
        {
            "inputs": {"a": a},
            "steps": [
                {"id": "bad", "task": task("matmul", "${inputs.a}", "${inputs.a}")},
                {"id": "after", "task": task("relu", "${bad.outputs[0]}")},
            ],
        }
    )
    wf = await engine.submit(spec, tenant="default")
    await engine.shutdown()  # the process stops with the workflow running
    bad = wf.steps["bad"]
    bad.state, bad.error = StepState.FAILED, TaskFailure(Code.INTERNAL, "boom")
    await store.write(PutWorkflowStep(_step_record(wf, bad)), wait=True)
    await tasks.shutdown(grace=5.0)
    await store.close()

    store = SqliteStore(tmp_path)
    await store.open()
    tasks, engine = await _engine(journal=store)
    try:
        back = engine.get(wf.name, tenant="default")
        await asyncio.wait_for(back.wait(), 30)
        assert back.state is WorkflowState.FAILED and "boom" in back.error.message
        assert back.steps["after"].state is StepState.CANCELLED
    finally:
        await engine.shutdown()
        await tasks.shutdown(grace=1.0)
        await store.close()


def _chain(n: int, *, keep: str = "") -> dict:
    steps = [{"id": "s0", "task": task("relu", "${inputs.a}")}]
    for i in range(1, n):
        steps.append({"id": f"s{i}", "task": task("relu", f"${{s{i - 1}.outputs[0]}}")})
    for step in steps:
        if step["id"] == keep:
            step["keep_outputs"] = True
    return {"steps": steps}


async def test_intermediate_outputs_are_freed_and_memory_returns_to_baseline(engine):
    import gc
    import tracemalloc

    store = engine.tasks.store
    mib = np.full((512, 512), -1.0, np.float32)  # 1 MiB per step output
    await finished(engine, {"inputs": {"a": mib.copy()}, **_chain(2)})  # warm: kernels compiled
    gc.collect()
    count, used = len(store), store.used_bytes
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        wf = await finished(engine, {"inputs": {"a": mib.copy()}, **_chain(8)})
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert wf.state is WorkflowState.SUCCEEDED, wf.error
    # Only the result (the last step's output) is left: the input copy given inline and
    # the seven intermediate outputs are gone from the store and from memory.
    assert len(store) == count + 1
    assert store.used_bytes == used + mib.nbytes
    assert grown < mib.nbytes + (256 << 10), f"{grown} bytes still held"
    for i in range(7):
        with pytest.raises(NotFound):
            store.get(wf.steps[f"s{i}"].outputs[0], tenant="default")
        # the finished task still names its output, with its dtype and shape
        ref = engine.tasks.get(wf.steps[f"s{i}"].task, tenant="default").output_refs[0]
        assert ref.name == wf.steps[f"s{i}"].outputs[0] and ref.array.shape == mib.shape
    np.testing.assert_array_equal(output(engine, wf, "s7"), np.zeros_like(mib))


async def test_keep_outputs_keeps_an_intermediate_output(engine):
    a = np.arange(-4, 4, dtype=np.float32)
    wf = await finished(engine, {"inputs": {"a": a}, **_chain(3, keep="s1")})
    assert wf.state is WorkflowState.SUCCEEDED, wf.error
    np.testing.assert_array_equal(output(engine, wf, "s1"), np.maximum(a, 0))
    with pytest.raises(NotFound):
        output(engine, wf, "s0")


async def test_an_input_given_by_name_is_the_callers_and_kept(engine):
    a = engine.tasks.store.put(np.ones(4, np.float32), tenant="default").name
    wf = await finished(engine, {"inputs": {"a": a}, **_chain(2)})
    assert wf.state is WorkflowState.SUCCEEDED, wf.error
    assert engine.tasks.store.get(a, tenant="default").array.shape == (4,)


async def test_freed_intermediates_stay_freed_after_a_restart(tmp_path):
    store = SqliteStore(tmp_path)
    await store.open()
    tasks, engine = await _engine(journal=store)
    try:
        wf = await finished(engine, {"inputs": {"a": np.ones(16, np.float32)}, **_chain(4)})
        assert wf.state is WorkflowState.SUCCEEDED, wf.error
        kept = {n for n in [wf.steps["s3"].outputs[0]]}
    finally:
        await engine.shutdown()
        await tasks.shutdown(grace=1.0)
        await store.close()
    store = SqliteStore(tmp_path)
    await store.open()
    tasks, engine = await _engine(journal=store)
    try:
        assert {name for name in tasks.store._items} == kept
        back = engine.get(wf.name, tenant="default")
        assert back.state is WorkflowState.SUCCEEDED
        assert back.steps["s0"].view.outputs == tuple(wf.steps["s0"].outputs)
    finally:
        await engine.shutdown()
        await tasks.shutdown(grace=1.0)
        await store.close()


async def test_steps_pass_tensors_by_reference_never_as_bytes(tmp_path):
    from kernelmesh.core.store import codec
    from kernelmesh.core.store.base import inputs_key

    store = SqliteStore(tmp_path)
    await store.open()
    tasks, engine = await _engine(journal=store)
    try:
        a = np.ones((64, 64), np.float32)
        wf = await finished(
            engine,
            {
                "inputs": {"a": a},
                "steps": [
                    {"id": "m", "task": task("matmul", "${inputs.a}", "${inputs.a}")},
                    {"id": "r", "task": task("relu", "${m.outputs[0]}")},
                ],
            },
        )
        assert wf.state is WorkflowState.SUCCEEDED, wf.error
        await store.sync()
        blobs = (await store.load()).blobs
        for sid in ("m", "r"):
            task_id = wf.steps[sid].task.removeprefix("tasks/")
            journaled = codec.decode(blobs[inputs_key(task_id)])
            # each input is a stored tensor's name: the journal holds no copy of its bytes
            assert all(isinstance(i, str) and i.startswith("tensors/") for i in journaled)
        assert codec.decode(blobs[inputs_key(wf.steps["r"].task.removeprefix("tasks/"))]) == [
            wf.steps["m"].outputs[0]
        ]
    finally:
        await engine.shutdown()
        await tasks.shutdown(grace=1.0)
        await store.close()


class _HeldStore(SqliteStore):
    """Commits wait while `held` is cleared (the writer thread blocks)."""

    def __init__(self, *args, **kwargs) -> None:
        import threading

        super().__init__(*args, **kwargs)
        self.open_gate = threading.Event()
        self.open_gate.set()

    def _commit(self, batch):
        self.open_gate.wait(30)
        return super()._commit(batch)


async def test_a_step_is_shown_finished_only_once_committed_while_its_dependants_run(tmp_path):
    store = _HeldStore(tmp_path)
    await store.open()
    tasks, engine = await _engine(journal=store)
    try:
        spec = spec_from_dict({"inputs": {"a": np.ones(16, np.float32)}, **_chain(3)})
        wf = await engine.submit(spec, tenant="default")  # committed before it returns
        store.open_gate.clear()
        deadline = time.monotonic() + 20
        while any(s.state is not StepState.SUCCEEDED for s in wf.steps.values()):
            assert time.monotonic() < deadline, "the chain waited for commits"
            await asyncio.sleep(0.005)
        # every step ran, one on the other's result, with nothing committed yet:
        assert all(s.view.state is not StepState.SUCCEEDED for s in wf.steps.values())
        assert wf.state is WorkflowState.RUNNING and not wf._done.is_set()
        store.open_gate.set()
        await asyncio.wait_for(wf.wait(), 20)
        assert wf.state is WorkflowState.SUCCEEDED
        assert all(s.view.state is StepState.SUCCEEDED for s in wf.steps.values())
        rows = (await store.load_workflows()).steps[wf.id]
        assert {r.step_id: r.state for r in rows} == {
            f"s{i}": int(StepState.SUCCEEDED) for i in range(3)
        }
    finally:
        store.open_gate.set()
        await engine.shutdown()
        await tasks.shutdown(grace=1.0)
        await store.close()


async def test_a_step_end_whose_commit_fails_is_written_again_and_shown(tmp_path, monkeypatch):
    from kernelmesh.core.store import sql
    from kernelmesh.core.store.workflow_records import PutWorkflowStep

    store = SqliteStore(tmp_path)
    await store.open()
    tasks, engine = await _engine(journal=store)
    plan, failures = sql.plan, []

    def failing_once(ops, files):
        ops = list(ops)
        if not failures and any(isinstance(op, PutWorkflowStep) for op in ops):
            failures.append(len(ops))
            raise OSError("disk hiccup")
        return plan(ops, files)

    try:
        spec = spec_from_dict({"inputs": {"a": np.ones(16, np.float32)}, **_chain(3)})
        wf = await engine.submit(spec, tenant="default")
        monkeypatch.setattr(sql, "plan", failing_once)
        await asyncio.wait_for(wf.wait(), 20)
        assert failures, "a commit holding a step's end failed"
        assert wf.state is WorkflowState.SUCCEEDED
        rows = (await store.load_workflows()).steps[wf.id]
        assert sorted(r.step_id for r in rows if r.state == int(StepState.SUCCEEDED)) == [
            "s0",
            "s1",
            "s2",
        ]
    finally:
        await engine.shutdown()
        await tasks.shutdown(grace=1.0)
        await store.close()
