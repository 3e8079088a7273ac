"""``dualflow info``: versions, devices, the CUDA library, distributed backends."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")


def run(args: argparse.Namespace) -> int:
    from dualflow.utils import sysinfo

    info = sysinfo.collect()
    print(json.dumps(info, indent=2) if args.json else sysinfo.render(info))
    return 0
