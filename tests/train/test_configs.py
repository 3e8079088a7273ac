"""Every shipped config parses, fits the process count its launch command gives, cuts into stages, and
finds enough data on this machine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dualflow.launcher.config import load_config
from dualflow.train.config import TrainConfig
from dualflow.train.data import BatchLoader, load_streams, validation_batches
from dualflow.train.partition import balanced_partition, num_stages, stage_costs

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


def test_the_configs_are_there():
    assert {p.stem for p in CONFIGS} >= {"tiny_moe", "gpu1", "gpu2", "gpu4", "gpu8", "multinode"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config(path):
    cfg = load_config(TrainConfig, path)
    par = cfg.parallel
    command = re.search(r"dualflow launch (.*?) -- -m dualflow train configs/" + path.name, path.read_text())
    assert command, "the header shows the launch command"
    nodes = re.search(r"--nnodes (\d+)", command.group(1)) or re.search(r"--nodes (\d+)", path.read_text())
    procs = int(re.search(r"--nproc-per-node (\d+)", command.group(1)).group(1)) * (int(nodes.group(1)) if nodes
                                                                                       else 1)
    assert procs == par.world
    n = 1 if par.pp == 1 else num_stages(par.schedule, par.pp)
    embed, layers, head = stage_costs(cfg.model, cfg.data.seq_len)
    assert len(balanced_partition(layers, n, embed, head)) == n
    streams = load_streams(cfg.data)
    BatchLoader(streams.train, cfg.data.seq_len, cfg.train.global_batch, dp_size=par.dp)
    validation_batches(streams.val, cfg.data.seq_len, cfg.train.global_batch, cfg.train.val_batches, dp_size=par.dp)
