"""A workflow as data: named steps, each a kernel task or an LLM call, with
its dependencies, retry policy and timeout. One shape for the proto (built by
the servicer) and for YAML files: `spec_from_dict` reads both.

    steps:
      - id: embed
        llm: {embed: {model: local, inputs: ["a", "b"]}}
      - id: sim
        task: {op: matmul, inputs: ["${embed.outputs[0]}", "${t.outputs[0]}"]}
        retry_policy: {maximum_attempts: 2, initial_interval: 0.5}
        timeout: 30
        continue_on_failure: false
        keep_outputs: false   # true: kept after the steps that use it end
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from kernelmesh.core.devices import DeviceKind, DeviceSelector
from kernelmesh.core.errors import Violation
from kernelmesh.core.task_retry import RetryPolicy

# A bound on what one submission may hold, checked before anything else, so a
# huge spec costs only its parse.
MAX_STEPS = 2_000
MAX_DEPENDS = 1_000
STEP_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
INPUT_NAME = STEP_ID
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TaskAction:
    op: str
    # A stored tensor's name, a "${...}" reference, or (before submission
    # stores it) an inline array.
    inputs: tuple[str | np.ndarray, ...]
    params: Mapping[str, object] = field(default_factory=dict)
    selector: DeviceSelector = field(default_factory=DeviceSelector)
    priority: int = 0


@dataclass(frozen=True)
class LlmAction:
    kind: str  # "generate" | "embed"
    model: str
    # generate: (role, content) pairs; embed: the texts.
    messages: tuple[tuple[str, str], ...] = ()
    inputs: tuple[str, ...] = ()
    max_tokens: int = 0
    temperature: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class StepSpec:
    id: str
    action: TaskAction | LlmAction
    depends_on: tuple[str, ...] = ()
    retry: RetryPolicy | None = None
    timeout: float | None = None
    continue_on_failure: bool = False
    # Outputs kept after the steps that use them ended (by default only the
    # outputs no step uses, the workflow's results, are kept).
    keep_outputs: bool = False


@dataclass(frozen=True)
class WorkflowSpec:
    steps: tuple[StepSpec, ...]
    # Name -> a stored tensor's name, or an inline array before submission.
    inputs: Mapping[str, str | np.ndarray] = field(default_factory=dict)


class SpecError(ValueError):
    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


# -- reading ------------------------------------------------------------------


def spec_from_dict(data: Mapping[str, object]) -> WorkflowSpec:
    """The spec from its dict form (YAML, JSON, or the servicer's translation of
    the proto). Raises SpecError naming every malformed field."""
    violations: list[Violation] = []
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, Sequence) or isinstance(raw_steps, str) or not raw_steps:
        raise SpecError([Violation("steps", "required: a list of at least one step")])
    if len(raw_steps) > MAX_STEPS:
        raise SpecError(
            [Violation("steps", f"{len(raw_steps)} steps; a workflow holds at most {MAX_STEPS}")]
        )
    steps = []
    for i, raw in enumerate(raw_steps):
        step = _step(raw, f"steps[{i}]", violations)
        if step is not None:
            steps.append(step)
    inputs: dict[str, str | np.ndarray] = {}
    raw_inputs = data.get("inputs") or {}
    if not isinstance(raw_inputs, Mapping):
        violations.append(Violation("inputs", "a mapping of name to tensor"))
    else:
        for name, value in raw_inputs.items():
            if not isinstance(name, str) or not INPUT_NAME.match(name):
                violations.append(Violation(f"inputs[{name}]", "an input name: [A-Za-z_][\\w-]*"))
            elif isinstance(value, np.ndarray | str):
                inputs[name] = value
            else:
                violations.append(Violation(f"inputs[{name}]", "a tensor or a tensor's name"))
    if violations:
        raise SpecError(violations)
    return WorkflowSpec(tuple(steps), inputs)


def _step(raw: object, where: str, violations: list[Violation]) -> StepSpec | None:
    if not isinstance(raw, Mapping):
        violations.append(Violation(where, "a step: a mapping with id and task or llm"))
        return None
    before = len(violations)
    step_id = raw.get("id")
    if not isinstance(step_id, str) or not STEP_ID.match(step_id) or step_id == "inputs":
        violations.append(
            Violation(
                f"{where}.id",
                "required: 1-64 letters, digits, '_' or '-', starting with a letter or '_' "
                "(and not 'inputs')",
            )
        )
    depends = raw.get("depends_on") or []
    if isinstance(depends, str) or not isinstance(depends, Sequence):
        violations.append(Violation(f"{where}.depends_on", "a list of step ids"))
        depends = []
    elif len(depends) > MAX_DEPENDS:
        violations.append(Violation(f"{where}.depends_on", f"at most {MAX_DEPENDS} steps"))
        depends = []
    action: TaskAction | LlmAction | None = None
    has_task, has_llm = raw.get("task") is not None, raw.get("llm") is not None
    if has_task == has_llm:
        violations.append(Violation(where, "set exactly one of task or llm"))
    elif has_task:
        action = _task(raw["task"], f"{where}.task", violations)
    else:
        action = _llm(raw["llm"], f"{where}.llm", violations)
    retry = _retry(raw.get("retry_policy"), f"{where}.retry_policy", violations)
    timeout = raw.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        violations.append(Violation(f"{where}.timeout", "seconds, > 0"))
        timeout = None
    if len(violations) > before or action is None:
        return None
    return StepSpec(
        id=str(step_id),  # a str: checked above
        action=action,
        depends_on=tuple(str(d) for d in depends),
        retry=retry,
        timeout=float(timeout) if timeout is not None else None,
        continue_on_failure=bool(raw.get("continue_on_failure", False)),
        keep_outputs=bool(raw.get("keep_outputs", False)),
    )


def _task(raw: object, where: str, violations: list[Violation]) -> TaskAction | None:
    if not isinstance(raw, Mapping):
        violations.append(Violation(where, "a task: op, inputs, params, device"))
        return None
    op = raw.get("op")
    if not isinstance(op, str) or not op:
        violations.append(Violation(f"{where}.op", "required; ListOps shows the catalog"))
    inputs = raw.get("inputs") or []
    if isinstance(inputs, str) or not isinstance(inputs, Sequence):
        violations.append(Violation(f"{where}.inputs", "a list"))
        inputs = []
    for j, item in enumerate(inputs):
        if not isinstance(item, str | np.ndarray):
            violations.append(
                Violation(f"{where}.inputs[{j}]", "a tensor's name or a ${...} reference")
            )
    params = raw.get("params") or {}
    if not isinstance(params, Mapping):
        violations.append(Violation(f"{where}.params", "a mapping of param name to value"))
        params = {}
    selector = DeviceSelector()
    device = raw.get("device") or {}
    if isinstance(device, str):
        device = {"name": device}
    if not isinstance(device, Mapping):
        violations.append(Violation(f"{where}.device", "a selector: {kind: cpu} or {name: ...}"))
    else:
        kind = device.get("kind")
        try:
            selector = DeviceSelector(
                kind=DeviceKind(str(kind).lower()) if kind else None,
                name=str(device.get("name") or ""),
            )
        except ValueError:
            known = ", ".join(k.value for k in DeviceKind)
            violations.append(Violation(f"{where}.device.kind", f"one of {known}"))
    priority = raw.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        violations.append(Violation(f"{where}.priority", "an integer"))
        priority = 0
    if not isinstance(op, str):
        return None
    return TaskAction(op, tuple(inputs), dict(params), selector, priority)


def _llm(raw: object, where: str, violations: list[Violation]) -> LlmAction | None:
    if (
        not isinstance(raw, Mapping)
        or len(raw) != 1
        or next(iter(raw))
        not in (
            "generate",
            "embed",
        )
    ):
        violations.append(Violation(where, "one of {generate: {...}} or {embed: {...}}"))
        return None
    kind, body = next(iter(raw.items()))
    where = f"{where}.{kind}"
    if not isinstance(body, Mapping):
        violations.append(Violation(where, "a mapping"))
        return None
    model = body.get("model") or ""
    if not isinstance(model, str):
        violations.append(Violation(f"{where}.model", "a model name"))
        model = ""
    if kind == "embed":
        texts = body.get("inputs")
        if (
            isinstance(texts, str)
            or not isinstance(texts, Sequence)
            or not texts
            or not all(isinstance(t, str) for t in texts)
        ):
            violations.append(Violation(f"{where}.inputs", "required: a list of texts"))
            return None
        return LlmAction("embed", model, inputs=tuple(texts))
    messages: list[tuple[str, str]] = []
    if body.get("prompt") is not None:
        if not isinstance(body["prompt"], str):
            violations.append(Violation(f"{where}.prompt", "a text"))
        else:
            messages.append(("user", body["prompt"]))
    raw_messages = body.get("messages") or []
    if not isinstance(raw_messages, Sequence) or isinstance(raw_messages, str):
        violations.append(Violation(f"{where}.messages", "a list of {role, content}"))
        raw_messages = []
    for j, m in enumerate(raw_messages):
        if (
            not isinstance(m, Mapping)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            violations.append(
                Violation(f"{where}.messages[{j}]", f"{{role: {'|'.join(ROLES)}, content: text}}")
            )
        else:
            messages.append((m["role"], m["content"]))
    if not messages:
        violations.append(Violation(where, "set prompt or messages"))
        return None
    max_tokens = body.get("max_tokens", 0)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        violations.append(Violation(f"{where}.max_tokens", "an integer >= 0"))
        max_tokens = 0
    temperature = body.get("temperature")
    seed = body.get("seed")
    return LlmAction(
        "generate",
        model,
        messages=tuple(messages),
        max_tokens=max_tokens,
        temperature=float(temperature) if temperature is not None else None,
        seed=int(seed) if seed is not None else None,
    )


def _retry(raw: object, where: str, violations: list[Violation]) -> RetryPolicy | None:
    if raw is None:
        return None
    if isinstance(raw, RetryPolicy):
        return raw
    if not isinstance(raw, Mapping):
        violations.append(Violation(where, "a retry policy"))
        return None
    try:
        initial = float(raw.get("initial_interval") or 1.0)
        backoff = float(raw.get("backoff_coefficient") or 2.0)
        maximum = raw.get("maximum_interval")
        maximum = float(maximum) if maximum is not None else None
        attempts = int(raw.get("maximum_attempts") or 3)
    except (TypeError, ValueError):
        violations.append(Violation(where, "numbers: seconds, a coefficient, an attempt count"))
        return None
    before = len(violations)
    if initial <= 0:
        violations.append(Violation(f"{where}.initial_interval", "must be > 0"))
    if maximum is not None and maximum < initial:
        violations.append(Violation(f"{where}.maximum_interval", "must be >= initial_interval"))
    if not 1.0 <= backoff <= 100.0:
        violations.append(Violation(f"{where}.backoff_coefficient", "must be in [1, 100]"))
    if not 1 <= attempts <= 100:
        violations.append(Violation(f"{where}.maximum_attempts", "must be in [1, 100]"))
    codes = raw.get("non_retryable") or ()
    if len(violations) > before:
        return None
    return RetryPolicy(initial, backoff, maximum, attempts, frozenset(int(c) for c in codes))


# -- writing (the durable form) -------------------------------------------------


def spec_to_dict(spec: WorkflowSpec) -> dict[str, object]:
    """The JSON-safe form `spec_from_dict` reads back; inline arrays must have
    been stored (replaced by names) first."""
    return {
        "inputs": {k: _name(v) for k, v in spec.inputs.items()},
        "steps": [_step_dict(s) for s in spec.steps],
    }


def _name(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("an inline tensor must be stored before the spec is written")
    return value


def _step_dict(step: StepSpec) -> dict[str, object]:
    out: dict[str, object] = {"id": step.id, "depends_on": list(step.depends_on)}
    action = step.action
    if isinstance(action, TaskAction):
        device: dict[str, str] = {}
        if action.selector.kind is not None:
            device["kind"] = action.selector.kind.value
        if action.selector.name:
            device["name"] = action.selector.name
        out["task"] = {
            "op": action.op,
            "inputs": [_name(i) for i in action.inputs],
            "params": dict(action.params),
            "device": device,
            "priority": action.priority,
        }
    elif action.kind == "embed":
        out["llm"] = {"embed": {"model": action.model, "inputs": list(action.inputs)}}
    else:
        body: dict[str, object] = {
            "model": action.model,
            "messages": [{"role": r, "content": c} for r, c in action.messages],
            "max_tokens": action.max_tokens,
        }
        if action.temperature is not None:
            body["temperature"] = action.temperature
        if action.seed is not None:
            body["seed"] = action.seed
        out["llm"] = {"generate": body}
    if step.retry is not None:
        out["retry_policy"] = step.retry.to_json()
    if step.timeout is not None:
        out["timeout"] = step.timeout
    if step.continue_on_failure:
        out["continue_on_failure"] = True
    if step.keep_outputs:
        out["keep_outputs"] = True
    return out
