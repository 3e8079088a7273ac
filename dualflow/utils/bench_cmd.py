"""``dualflow bench NAME [ARGS...]``: run the benchmark script ``NAME.py`` with its own arguments.

The scripts are ``benchmarks/`` of the source tree; an installed package carries them as
``dualflow/benchmarks/`` (pyproject.toml's ``wheel.force-include``).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]
# installed: inside the package; a checkout (editable install included): beside it
BENCH_DIR = next((d for d in (_PACKAGE / "benchmarks", _PACKAGE.parent / "benchmarks") if d.is_dir()),
                 _PACKAGE / "benchmarks")


def available() -> list[str]:
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(available()) or "none found"
    parser.add_argument("name", nargs="?", help=f"benchmark to run ({names})")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")


def run(args: argparse.Namespace) -> int:
    names = available()
    if not args.name:
        print("benchmarks: " + (", ".join(names) if names else f"none (no {BENCH_DIR})"))
        return 0
    if args.name not in names:
        print(f"unknown benchmark {args.name!r}; available: {', '.join(names) or 'none'} (in {BENCH_DIR})",
              file=sys.stderr)
        return 2
    script = BENCH_DIR / f"{args.name}.py"
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0
