"""SLURM's compressed host and task lists, expanded without SLURM.

``gpu[01-04,07],cpu-a[1-2]`` -> ``gpu01 gpu02 gpu03 gpu04 gpu07 cpu-a1 cpu-a2``; several bracket groups in
one name multiply (``n[1-2]-ib[0-1]`` -> ``n1-ib0 n1-ib1 n2-ib0 n2-ib1``); a range keeps the zero padding
of its lower bound. :func:`hostnames` prefers ``scontrol show hostnames`` when it answers quickly and
falls back to :func:`expand_nodelist` (a login node without slurm.conf makes scontrol retry for a minute).
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from collections.abc import Mapping

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_REPEAT = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' at position {i} of nodelist {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unmatched ']' at position {i} of nodelist {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unclosed '[' in nodelist {text!r}")
    items.append(text[start:])
    return items


def _expand_group(group: str, whole: str) -> list[str]:
    """``01-04,07`` -> ``['01', '02', '03', '04', '07']``."""
    out = []
    for part in group.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise ValueError(f"bad range {part!r} in nodelist {whole!r}: expected N or N-M with digits")
        lo_text, hi_text = m.group(1), m.group(2) or m.group(1)
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(f"descending range {part!r} in nodelist {whole!r}")
        width = len(lo_text)
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """All host names of a SLURM nodelist, in SLURM's order (duplicates kept, as scontrol does)."""
    text = nodelist.strip()
    hosts: list[str] = []
    for item in filter(None, _split_top_level(text)):  # "a,,b" is "a,b", as in SLURM
        # "n[1-2]-ib[0-1]" -> literal pieces and bracket groups, alternating.
        pieces = re.split(r"\[([^\]]*)\]", item)
        choices = [[p] if i % 2 == 0 else _expand_group(p, nodelist) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise ValueError(f"nodelist {nodelist!r} names no host")
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE's form: ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for part in spec.strip().split(","):
        m = _REPEAT.match(part.strip())
        if not m:
            raise ValueError(f"bad tasks-per-node entry {part!r} in {spec!r}: expected N or N(xK)")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def hostnames(nodelist: str, environ: Mapping[str, str] | None = None, timeout: float = 5.0) -> list[str]:
    """Expand ``nodelist`` with ``scontrol show hostnames`` when it works, else with :func:`expand_nodelist`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            res = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=timeout, env=None if environ is None else dict(environ))
            names = res.stdout.split()
            if res.returncode == 0 and names:
                return names
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_nodelist(nodelist)
