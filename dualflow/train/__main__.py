"""``python -m dualflow.train CONFIG.toml ...``: the same as ``dualflow train``."""

import sys

from dualflow.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
