"""Checks a workflow before anything runs: unknown or self references,
cycles (named), text where a tensor is needed (and the reverse), and each
task step against the op catalog with the shapes and dtypes that flow into
it, so a dtype mismatch three steps down is found at submission."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from kernelmesh.core import ops
from kernelmesh.core.devices import LocalDevice, SelectCache, select
from kernelmesh.core.errors import FailedPrecondition, InvalidArgument, KernelmeshError, Violation
from kernelmesh.core.workflows.refs import Ref, tensor_ref, text_refs
from kernelmesh.core.workflows.spec import LlmAction, StepSpec, TaskAction, WorkflowSpec

# What a step produces, as far as it can be known before it runs. None: not known.
_TEXT = "text"


@dataclass(frozen=True)
class Plan:
    """A valid workflow's graph: each step's dependencies (declared and implied
    by references) and the steps in an order where dependencies come first."""

    deps: dict[str, tuple[str, ...]]
    order: tuple[str, ...]


def validate(
    spec: WorkflowSpec,
    *,
    tensor_meta: Callable[[str], ops.TensorMeta | None],
    devices: Sequence[LocalDevice],
    limits: ops.Limits,
    models: Mapping[str, str] | None = None,
) -> Plan:
    """`tensor_meta(name)`: a stored tensor's dtype and shape, None when missing.
    `models`: model name -> "chat" or "embedding", when the gateway is known.
    Raises InvalidArgument with one violation per problem, or FailedPrecondition
    when every step is well formed but no device can run one."""
    violations: list[Violation] = []
    index = {}
    for i, step in enumerate(spec.steps):
        if step.id in index:
            violations.append(Violation(f"steps[{i}].id", f"{step.id!r} is used by two steps"))
        else:
            index[step.id] = i
    input_metas: dict[str, ops.TensorMeta | None] = {}
    for name, value in spec.inputs.items():
        if isinstance(value, str):
            meta = tensor_meta(value)
            if meta is None:
                violations.append(Violation(f"inputs[{name}]", f"tensor {value!r} not found"))
            input_metas[name] = meta
        else:
            input_metas[name] = ops.TensorMeta(value.dtype.name, tuple(value.shape))

    deps: dict[str, list[str]] = {}
    refs_of: dict[str, list[tuple[str, Ref]]] = {}
    for i, step in enumerate(spec.steps):
        where = f"steps[{i}]"
        mine = deps.setdefault(step.id, [])
        for j, dep in enumerate(step.depends_on):
            if dep == step.id:
                violations.append(
                    Violation(f"{where}.depends_on[{j}]", "a step cannot depend on itself")
                )
            elif dep not in index:
                violations.append(Violation(f"{where}.depends_on[{j}]", f"no step {dep!r}"))
            elif dep not in mine:
                mine.append(dep)
        found = refs_of.setdefault(step.id, [])
        for field, ref in _references(step, where, violations):
            found.append((field, ref))
            if ref.is_input:
                if ref.field not in spec.inputs:
                    known = ", ".join(sorted(spec.inputs)) or "none given"
                    violations.append(
                        Violation(field, f"no workflow input {ref.field!r} (inputs: {known})")
                    )
            elif ref.source == step.id:
                violations.append(Violation(field, "a step cannot refer to its own outputs"))
            elif ref.source not in index:
                violations.append(Violation(field, f"{ref.text}: no step {ref.source!r}"))
            elif ref.source not in mine:
                mine.append(ref.source)  # a reference implies the dependency

    order, cycle = _order(spec, deps)
    if cycle:
        first = index[cycle[0]]
        violations.append(
            Violation(f"steps[{first}].depends_on", "cycle: " + " -> ".join([*cycle, cycle[0]]))
        )
    if violations:
        raise InvalidArgument(violations)

    refusals = _check_types(
        spec, order, index, refs_of, input_metas, tensor_meta, devices, limits, models, violations
    )
    if violations:
        raise InvalidArgument(violations)
    if refusals:
        raise FailedPrecondition("; ".join(refusals))
    return Plan({k: tuple(v) for k, v in deps.items()}, tuple(order))


def plan_of(spec: WorkflowSpec) -> Plan:
    """The graph of a spec validated before (read back from the store)."""
    deps: dict[str, list[str]] = {}
    for step in spec.steps:
        mine = list(dict.fromkeys(step.depends_on))
        for _, ref in _references(step, "", []):
            if not ref.is_input and ref.source not in mine:
                mine.append(ref.source)
        deps[step.id] = mine
    order, cycle = _order(spec, deps)
    if cycle:
        raise ValueError("cycle: " + " -> ".join(cycle))
    return Plan({k: tuple(v) for k, v in deps.items()}, tuple(order))


def _references(
    step: StepSpec, where: str, violations: list[Violation]
) -> Iterator[tuple[str, Ref]]:
    action = step.action
    if isinstance(action, TaskAction):
        for j, item in enumerate(action.inputs):
            if not isinstance(item, str):
                continue
            field = f"{where}.task.inputs[{j}].ref"
            try:
                ref = tensor_ref(item)
            except ValueError as exc:
                violations.append(Violation(field, str(exc)))
                continue
            if ref is not None:
                yield field, ref
        return
    texts = (
        [(f"{where}.llm.embed.inputs[{j}]", t) for j, t in enumerate(action.inputs)]
        if action.kind == "embed"
        else [
            (f"{where}.llm.generate.messages[{j}].content", c)
            for j, (_, c) in enumerate(action.messages)
        ]
    )
    for field, text in texts:
        try:
            for ref in text_refs(text):
                yield field, ref
        except ValueError as exc:
            violations.append(Violation(field, str(exc)))


def _order(spec: WorkflowSpec, deps: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """Kahn's order; and, when there is a cycle, one cycle's steps in order."""
    waiting = {s.id: len(deps[s.id]) for s in spec.steps}
    dependants: dict[str, list[str]] = {s.id: [] for s in spec.steps}
    for step_id, ds in deps.items():
        for d in ds:
            dependants[d].append(step_id)
    ready = [s.id for s in spec.steps if waiting[s.id] == 0]
    order: list[str] = []
    while ready:
        step_id = ready.pop()
        order.append(step_id)
        for nxt in dependants[step_id]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
    if len(order) == len(spec.steps):
        return order, []
    # Walk back along unfinished dependencies from an unfinished step until a
    # step repeats: the walk from there is a cycle.
    left = {k for k, n in waiting.items() if n > 0}
    node = next(s.id for s in spec.steps if s.id in left)
    seen: dict[str, int] = {}
    path: list[str] = []
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(d for d in deps[node] if d in left)
    cycle = path[seen[node] :]
    cycle.reverse()  # as "a -> b": b depends on a
    return order, cycle


def _check_types(
    spec: WorkflowSpec,
    order: list[str],
    index: dict[str, int],
    refs_of: dict[str, list[tuple[str, Ref]]],
    input_metas: dict[str, ops.TensorMeta | None],
    tensor_meta: Callable[[str], ops.TensorMeta | None],
    devices: Sequence[LocalDevice],
    limits: ops.Limits,
    models: Mapping[str, str] | None,
    violations: list[Violation],
) -> list[str]:
    """Walks the steps in order, knowing what each one produces, and checks
    each consumer. Returns the device refusals (FAILED_PRECONDITION)."""
    produces: dict[str, object] = {}  # step -> _TEXT, or a tuple of metas (a meta may be None)
    refusals: list[str] = []
    capable: SelectCache = {}  # select()'s, for these devices: steps repeat ops
    for step_id in order:
        i = index[step_id]
        step = spec.steps[i]
        where = f"steps[{i}]"
        action = step.action
        if isinstance(action, LlmAction):
            for field, text_ref in refs_of[step_id]:
                if (
                    text_ref.is_input
                    or produces.get(text_ref.source) != _TEXT
                    or text_ref.field != "text"
                ):
                    violations.append(
                        Violation(
                            field,
                            f"{text_ref.text}: text is needed here; only a generate step's "
                            "${step.text} is text",
                        )
                    )
            want = "embedding" if action.kind == "embed" else "chat"
            if want == "chat" and not action.model:
                violations.append(
                    Violation(f"{where}.llm.generate.model", "required: a chat model's name")
                )
            if models is not None and action.model and models.get(action.model) != want:
                violations.append(
                    Violation(
                        f"{where}.llm.{action.kind}.model",
                        f"no {want} model {action.model!r} is configured (ListModels shows them)",
                    )
                )
            produces[step_id] = _TEXT if action.kind == "generate" else (None,)
            continue
        metas: list[ops.TensorMeta | None] = []
        for j, item in enumerate(action.inputs):
            field = f"{where}.task.inputs[{j}].ref"
            if not isinstance(item, str):
                metas.append(ops.TensorMeta(item.dtype.name, tuple(item.shape)))
                continue
            ref = tensor_ref(item)
            if ref is None:
                meta = tensor_meta(item)
                if meta is None:
                    violations.append(Violation(field, f"tensor {item!r} not found"))
                metas.append(meta)
            elif ref.is_input:
                if ref.index is not None or ref.field not in input_metas:
                    metas.append(None)
                else:
                    metas.append(input_metas[ref.field])
            else:
                made = produces.get(ref.source)
                if made == _TEXT or ref.field != "outputs" or ref.index is None:
                    violations.append(
                        Violation(
                            field,
                            f"{ref.text}: a tensor is needed here; write ${{step.outputs[N]}}"
                            + (f" ({ref.source!r} produces text)" if made == _TEXT else ""),
                        )
                    )
                    metas.append(None)
                elif isinstance(made, tuple) and ref.index >= len(made):
                    violations.append(
                        Violation(field, f"{ref.text}: {ref.source!r} has {len(made)} output(s)")
                    )
                    metas.append(None)
                else:
                    metas.append(made[ref.index] if isinstance(made, tuple) else None)
        known = [m for m in metas if m is not None]
        if len(known) < len(metas):
            # Not known before it runs (an embedding's width): checked when it runs.
            if action.op not in ops.CATALOG:
                violations.append(
                    Violation(f"{where}.task.op", ops.unknown_op_description(action.op))
                )
            produces[step_id] = None
            continue
        try:
            call = ops.validate(action.op, known, action.params, limits)
        except ops.OpValidationError as exc:
            for v in exc.violations:
                violations.append(Violation(f"{where}.task.{v.field}", v.description))
            produces[step_id] = None
            continue
        produces[step_id] = tuple(call.outputs)
        try:
            select(
                devices,
                action.selector,
                action.op,
                known[0].dtype if known else "",
                shapes=[m.shape for m in call.inputs],
                params=call.params,
                cache=capable,
            )
        except FailedPrecondition as exc:
            refusals.append(f"step {step_id!r}: {exc.message}")
        except KernelmeshError as exc:
            violations.append(Violation(f"{where}.task.device", exc.message))
    return refusals
