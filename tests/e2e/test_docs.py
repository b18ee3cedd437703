"""Every command in the README and docs/ is run: each fenced `sh`/`bash` block
through bash (-e, -o pipefail) and each `python` block through this
interpreter, against the shared real server, with the default ports
(127.0.0.1:50051, 127.0.0.1:8080) replaced by the ones it got. YAML blocks are
loaded by the loader they are written for. A block preceded by
`<!-- docs-test: skip (reason) -->` is skipped with that reason. Links to files
in the repository must resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK_TIMEOUT_S = 120
# `kernelmesh warmup` compiles every kernel of every backend into the block's own
# empty caches: "about a minute on 2 cores" (README), over 120 s on a loaded machine.
COLD_COMPILE_TIMEOUT_S = 600
_FENCE = re.compile(
    r"(?:^<!-- docs-test: (?P<mark>.*?) -->\n)?^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```",
    re.S | re.M,
)
_SKIP = re.compile(r"^skip \((?P<reason>.+)\)$")
_LINK = re.compile(r"\]\((?!https?://|#|mailto:)(?P<target>[^)#\s]+)(?:#[^)]*)?\)")
# A document named in code spans (`ARCHITECTURE.md`) must exist too.
_NAMED_DOC = re.compile(r"`(?P<target>[\w./-]+\.md)`")
RUNNABLE = {"sh": "shell", "bash": "shell", "shell": "shell", "python": "python", "yaml": "yaml"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    body: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in _FENCE.finditer(text):
            lang = match.group("lang")
            if lang not in RUNNABLE:
                continue
            mark = match.group("mark")
            skip = None
            if mark is not None:
                skipped = _SKIP.match(mark)
                assert skipped, f"{path}: docs-test mark {mark!r} is not 'skip (reason)'"
                skip = skipped.group("reason")
            line = text.count("\n", 0, match.start("body"))
            found.append(Block(path, line, lang, match.group("body"), skip))
    return found


BLOCKS = blocks()


def test_docs_have_blocks_to_run():
    assert {b.path.name for b in BLOCKS} >= {"README.md", "operations.md"}
    assert sum(1 for b in BLOCKS if b.skip is None and RUNNABLE[b.lang] != "yaml") >= 8


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_to_repository_files_resolve(path):
    text = path.read_text()
    missing = [
        m.group("target")
        for m in _LINK.finditer(text)
        if not (path.parent / m.group("target")).exists()
    ]
    missing += [
        m.group("target")
        for m in _NAMED_DOC.finditer(text)
        if not (path.parent / m.group("target")).exists()
        and not (ROOT / m.group("target")).exists()
    ]
    assert missing == []


def _environment(served, tmp_path: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "KERNELMESH_TARGET": served.target,
        # `kernelmesh cache clear` in a block must not empty the caches of this machine
        "KERNELMESH_CACHE_DIR": str(tmp_path / "kernel-cache"),
        "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"),
    }


def _ported(body: str, served) -> str:
    return body.replace("127.0.0.1:50051", served.target).replace(
        "127.0.0.1:8080", f"127.0.0.1:{served.http_port}"
    )


def _check_yaml(body: str, tmp_path: Path) -> None:
    data = yaml.safe_load(body)
    assert isinstance(data, dict)
    path = tmp_path / "block.yaml"
    path.write_text(body)
    from kernelmesh.core import config

    if "models" in data:
        from kernelmesh.core.llm.config import load_config

        assert load_config(path).models
    elif set(data) <= {f for f in config.ServerConfig.__dataclass_fields__}:
        config.load(path)
    else:
        pytest.fail(f"a YAML block of unknown kind (keys {sorted(data)})")


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_doc_block_runs(block: Block, served, tmp_path):
    if block.skip:
        pytest.skip(block.skip)
    kind = RUNNABLE[block.lang]
    if kind == "yaml":
        _check_yaml(block.body, tmp_path)
        return
    body = _ported(block.body, served)
    command = (
        ["bash", "-euo", "pipefail", "-c", body]
        if kind == "shell"
        else [sys.executable, "-c", body]
    )
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env=_environment(served, tmp_path),
        capture_output=True,
        text=True,
        timeout=COLD_COMPILE_TIMEOUT_S if "kernelmesh warmup" in body else BLOCK_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, (
        f"{block.id}:\n{body}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )


def test_operations_metrics_table_names_every_metric():
    """Each kernelmesh_* and grpc_server_* family on /metrics has a row."""
    from prometheus_client import REGISTRY

    import kernelmesh.core.llm.metrics
    import kernelmesh.core.metrics
    import kernelmesh.services.rpc_metrics  # noqa: F401  (registers the families)

    table = (ROOT / "docs" / "operations.md").read_text()
    exposed = set()
    for family in REGISTRY.collect():
        if family.name.startswith(("kernelmesh_", "grpc_server_")):
            exposed.add(family.name + ("_total" if family.type == "counter" else ""))
    assert exposed
    assert sorted(n for n in exposed if f"| `{n}` |" not in table) == []
