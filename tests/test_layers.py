"""The floors of DESIGN.md, checked on the source: ``core/maths/`` (the paper's equations) imports nothing
above it (only ``core.maths`` and ``core.errors``), and nothing in ``core/`` imports gradio."""
import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "core"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth (function-level imports too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("path", sorted((CORE / "maths").glob("*.py")), ids=lambda p: p.name)
def test_maths_imports_nothing_above_it(path):
    above = [(line, m) for line, m in _imports(path)
             if m.startswith("core") and not (m.startswith("core.maths") or m == "core.errors")]
    assert not above, f"{path.name} imports {above}: the maths floor may use only core.maths and core.errors"


def test_core_never_imports_gradio():
    found = [(p.relative_to(CORE), line) for p in CORE.rglob("*.py") for line, m in _imports(p)
             if m.split(".")[0] in ("gradio", "gradio_client")]
    assert not found, found
