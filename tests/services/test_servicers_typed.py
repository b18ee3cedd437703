"""Every RPC method of every servicer is typed: its request, context and reply
(issue 14: servicers translate between typed messages and the domain)."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[2] / "services"


def rpc_methods() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Methods named like RPCs (CamelCase) taking a request (or request
    iterator) and a context, in any class of services/."""
    found = []
    for path in sorted(SERVICES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            for item in node.body:
                if not isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                names = [a.arg for a in item.args.args]
                if item.name[:1].isupper() and names[-1:] == ["context"]:
                    found.append((f"{path.name}:{node.name}.{item.name}", item))
    return found


def test_every_rpc_method_is_typed():
    methods = rpc_methods()
    assert len(methods) >= 35, "the servicers were not found"
    untyped = [
        name
        for name, fn in methods
        if fn.returns is None or any(a.annotation is None for a in fn.args.args[1:])
    ]
    assert not untyped, f"RPC methods without types: {untyped}"
