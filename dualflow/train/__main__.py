"""``python -m dualflow.train CONFIG.toml ...``: the same as ``dualflow train``."""

import argparse
import sys

from dualflow.train import cli

parser = argparse.ArgumentParser(prog="python -m dualflow.train", description="train the MoE model of a TOML config")
cli.add_arguments(parser)
sys.exit(cli.run(parser.parse_args()))
