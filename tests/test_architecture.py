"""The import rules of docs/architecture.md, checked on the source: one direction only, and each subpackage
alone.

__main__ -> cli -> train -> launcher -> dualpipe, comm, fp8 -> utils -> _cuda (LAYER below). dualpipe,
comm and fp8 never import each other; the training job composes them.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dualflow"
DOC = ROOT.parent / "docs" / "architecture.md"
LAYER = {"_cuda": 0, "utils": 1, "fp8": 2, "comm": 2, "dualpipe": 2, "launcher": 3, "train": 4, "cli": 5,
         "__main__": 6}
PEERS = {"fp8", "comm", "dualpipe"}


def _unit(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:  # `from dualflow import fp8`
                yield node.lineno, f"{node.module}.{alias.name}"


def test_imports_go_one_way():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        unit = _unit(path)
        if unit == "__init__":
            continue
        for lineno, name in _imports(path):
            parts = name.split(".")
            if parts[0] != "dualflow" or len(parts) < 2 or parts[1] not in LAYER:
                continue
            target = parts[1]
            if target == unit:
                continue
            if LAYER[target] >= LAYER[unit] or (unit in PEERS and target in PEERS):
                bad.append(f"{path.relative_to(ROOT.parent)}:{lineno} ({unit}) imports {name}")
    assert not bad, "imports against docs/architecture.md's direction:\n" + "\n".join(bad)


@pytest.mark.parametrize("pkg", ["fp8", "comm", "dualpipe", "utils", "launcher"])
def test_subpackage_imports_alone(pkg):
    others = sorted(set(LAYER) - {pkg, "utils", "_cuda", "__main__", "cli"} - ({"fp8", "comm", "dualpipe"}
                                                                         if pkg in ("launcher",) else set()))
    code = (f"import sys, dualflow.{pkg}\n"
            f"loaded = [m for m in {others!r} if 'dualflow.' + m in sys.modules]\n"
            "print(','.join(loaded))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "", f"importing dualflow.{pkg} also loaded: {out.stdout.strip()}"


def test_the_rules_are_those_of_the_document():
    # the layer table of docs/architecture.md is the one checked here
    rows = [line.split("|")[1:3] for line in DOC.read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    documented = {unit.strip(" `"): int(layer) for layer, units in rows for unit in units.split(",")}
    assert documented == LAYER, f"docs/architecture.md lists {documented}, the test checks {LAYER}"
