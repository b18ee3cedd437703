"""`${...}` references between steps: `${step.outputs[0]}` (a tensor an
earlier step produced), `${step.text}` (a generate step's text) and
`${inputs.name}` (a workflow input). A tensor input is one whole reference;
text may hold several, interpolated."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_REF = r"\$\{\s*([A-Za-z_][A-Za-z0-9_-]*)\s*\.\s*([A-Za-z_]+)\s*(?:\[\s*(\d+)\s*\])?\s*\}"
WHOLE = re.compile(rf"^{_REF}$")
ANY = re.compile(_REF)
OPEN = re.compile(r"\$\{")


@dataclass(frozen=True)
class Ref:
    """`${source.field[index]}`; source "inputs" names a workflow input (the field)."""

    source: str
    field: str
    index: int | None
    text: str

    @property
    def is_input(self) -> bool:
        return self.source == "inputs"


def _ref(match: re.Match[str]) -> Ref:
    index = match.group(3)
    return Ref(match.group(1), match.group(2), int(index) if index is not None else None, match[0])


def tensor_ref(value: str) -> Ref | None:
    """The reference when `value` is one whole `${...}`; None for a plain name.
    Raises ValueError for a malformed `${`."""
    match = WHOLE.match(value.strip())
    if match:
        return _ref(match)
    if OPEN.search(value):
        raise ValueError(
            f"{value!r} is not a reference: write ${{step.outputs[N]}} or ${{inputs.name}}"
        )
    return None


def text_refs(text: str) -> list[Ref]:
    """Every reference in a text. Raises ValueError for a `${` that is not one."""
    refs = [_ref(m) for m in ANY.finditer(text)]
    if len(OPEN.findall(text)) != len(refs):
        raise ValueError(f"{text!r} holds a ${{ that is not a reference such as ${{step.text}}")
    return refs


def interpolate(text: str, value_of: Callable[[Ref], str]) -> str:
    return ANY.sub(lambda m: value_of(_ref(m)), text)
