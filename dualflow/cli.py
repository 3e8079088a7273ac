"""The ``dualflow`` command: ``dualflow info|schedule|launch|doctor|train|tokenize|export-hf|bench`` and
``dualflow --version``.

Each subcommand lives in the module that owns it and exposes ``add_arguments(parser)`` and
``run(args) -> int``; the module is imported only when its subcommand runs, so ``dualflow info`` stays
fast and a broken optional dependency of one command never breaks another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dualflow import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("dualflow.utils.info_cmd", "versions, devices, the CUDA library, distributed backends"),
    "schedule": ("dualflow.dualpipe.cli", "generate, simulate and render pipeline schedules"),
    "launch": ("dualflow.launcher.cli", "start a job through torchrun (single node, multi-node, SLURM)"),
    "doctor": ("dualflow.launcher.doctor", "preflight checks: driver, NCCL, NVLink, limits"),
    "train": ("dualflow.train.cli", "train the MoE model of a TOML config"),
    "tokenize": ("dualflow.train.tokenize_cmd", "tokenize text files into token shards (data.source = \"binary\")"),
    "export-hf": ("dualflow.train.hf_io", "write a training checkpoint as a transformers DeepseekV3 checkpoint"),
    "bench": ("dualflow.utils.bench_cmd", "run a benchmark script of benchmarks/"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualflow", description="DualPipe pipelines, FP8 and MoE communication for PyTorch training."
    )
    parser.add_argument("-V", "--version", action="store_true", help="print the version of dualflow and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Arguments are added lazily in main() for the chosen command only.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"dualflow {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"dualflow {name}: not available in this version ({module_name} is missing)", file=sys.stderr)
        return 2
    sub = argparse.ArgumentParser(prog=f"dualflow {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
