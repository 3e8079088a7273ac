"""Every key of the training config refuses what it cannot take, naming the key as the user writes it.

The tables below are the specification: each key with the values it admits. A key added to the config
without an entry here fails ``test_every_key_has_a_specification``, so none slips through unchecked.
Values go through ``load_config`` (what ``dualflow train --key=value`` and TOML files use), and a few
through the real command line, in a subprocess: exit 2, one line naming the key, no traceback.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dualflow.launcher.config import ConfigError, config_keys, load_config
from dualflow.launcher.env import INT_VARIABLES
from dualflow.train.config import CheckpointConfig, RunConfig, TrainConfig
from dualflow.train.data import DataConfig
from dualflow.train.model import ModelConfig
from dualflow.train.optim import OptimConfig
from dualflow.train.parallel import ParallelConfig

ROOT = Path(__file__).resolve().parents[2]

# numeric keys: (the values at the edge of what the key admits, values just beyond it)
AT_LEAST_1 = (["1"], ["0", "-1"])
AT_LEAST_0 = (["0"], ["-1"])
POSITIVE = (["1e-12"], ["0", "0.0", "-1.0"])
NON_NEGATIVE = (["0.0"], ["-1e-9", "-1.0"])
FRACTION = (["1e-6", "0.999999"], ["0", "1", "-0.5", "1.5"])      # strictly between 0 and 1
BETA = (["0.0", "0.999999"], ["1", "1.0", "-0.1"])                  # 0 <= beta < 1
SEED = (["0", str(2**63 - 1)], ["-1", str(2**63)])

NUMERIC = {
    "model.vocab_size": AT_LEAST_1, "model.dim": AT_LEAST_1, "model.n_layers": AT_LEAST_1,
    "model.n_dense_layers": AT_LEAST_0, "model.n_heads": AT_LEAST_1, "model.dense_hidden": AT_LEAST_1,
    "model.expert_hidden": AT_LEAST_1, "model.n_routed_experts": AT_LEAST_1, "model.n_shared_experts": AT_LEAST_0,
    "model.top_k": AT_LEAST_1, "model.routed_scale": POSITIVE, "model.bias_update_speed": NON_NEGATIVE,
    "model.rope_theta": POSITIVE, "model.norm_eps": POSITIVE, "model.init_std": POSITIVE,
    "model.q_lora_rank": AT_LEAST_0, "model.kv_lora_rank": AT_LEAST_1, "model.qk_nope_head_dim": AT_LEAST_1,
    "model.qk_rope_head_dim": (["2"], ["1", "0", "-2"]), "model.v_head_dim": AT_LEAST_1,
    "model.n_group": AT_LEAST_1, "model.topk_group": AT_LEAST_1, "model.mtp_depth": AT_LEAST_0,
    "model.mtp_loss_weight": POSITIVE, "model.max_seq_len": AT_LEAST_1,
    "parallel.pp": AT_LEAST_1, "parallel.dp": AT_LEAST_1, "parallel.microbatches": AT_LEAST_1,
    "data.max_bytes": AT_LEAST_1, "data.val_fraction": FRACTION, "data.seq_len": AT_LEAST_1, "data.seed": SEED,
    "optim.lr": POSITIVE, "optim.min_lr": NON_NEGATIVE, "optim.warmup_steps": AT_LEAST_0,
    "optim.weight_decay": NON_NEGATIVE, "optim.beta1": BETA, "optim.beta2": BETA, "optim.eps": POSITIVE,
    "optim.grad_clip": NON_NEGATIVE,
    "train.steps": AT_LEAST_1, "train.global_batch": AT_LEAST_1, "train.seed": SEED, "train.log_every": AT_LEAST_1,
    "train.val_every": AT_LEAST_1, "train.val_batches": AT_LEAST_1, "train.profile_step": AT_LEAST_0,
    "checkpoint.every": AT_LEAST_0, "checkpoint.keep": AT_LEAST_1,
}
CHOICES = {
    "model.attention": ("mha", "mla"), "model.group_by": ("experts", "ep_ranks", "nodes"),
    "data.dtype": ("uint16", "uint32"), "parallel.schedule": ("dualpipev", "dualpipe", "1f1b", "zb1p"),
    "parallel.comm_checks": ("collective", "first", "local"), "data.source": ("stdlib", "text", "binary"),
    "optim.moments_dtype": ("float32", "bfloat16"), "train.dtype": ("float32", "bfloat16"),
    "train.cuda_graph": ("auto", "on", "off"),
    "train.compile": ("auto", "on", "off"), "train.fp8_wgrad_backend": ("auto", "cutlass", "triton"),
    "train.fp8_quant_backend": ("auto", "triton", "cuda", "reference"),
}
FLAGS = ("model.tie_embeddings", "parallel.overlap", "parallel.zero1", "train.fp8", "train.fp8_dispatch",
         "train.profile_trace", "checkpoint.enabled", "train.fp8_weight_snapshots")
TEXT = ("data.paths", "data.val_paths", "data.tokenizer", "data.eos_token", "train.run_dir", "checkpoint.dir",
        "train.fp8_backend")


def _problems(*overrides: str) -> tuple[str, ...]:
    try:
        load_config(TrainConfig, overrides=overrides)
    except ConfigError as exc:
        return exc.problems
    return ()


def _cases(table):
    return [pytest.param(key, value, id=f"{key}={value}") for key, (_, bad) in table.items() for value in bad]


def test_every_key_has_a_specification():
    keys = set(config_keys(TrainConfig))
    specified = set(NUMERIC) | set(CHOICES) | set(FLAGS) | set(TEXT)
    assert keys == specified, f"not specified here: {sorted(keys - specified)}; gone: {sorted(specified - keys)}"
    types = {k: tp for k, (tp, _) in config_keys(TrainConfig).items()}
    assert all(types[k] in (int, float) for k in NUMERIC) and all(types[k] is bool for k in FLAGS)


@pytest.mark.parametrize("key, value", _cases(NUMERIC))
def test_a_value_out_of_range_is_refused_naming_the_key(key, value):
    problems = _problems(f"{key}={value}")
    assert len(problems) == 1, problems
    received = float(value) if config_keys(TrainConfig)[key][0] is float else int(value)
    assert problems[0].startswith(f"{key}: expected ") and problems[0].endswith(f", got {received!r}"), problems[0]


@pytest.mark.parametrize("key", list(NUMERIC))
def test_the_edges_of_a_range_are_accepted(key):
    for value in NUMERIC[key][0]:
        # another key may still object (model.dim=1 does not split into 4 heads), never this one's range
        assert not [p for p in _problems(f"{key}={value}") if p.startswith(f"{key}: expected")], (key, value)


@pytest.mark.parametrize("key", list(NUMERIC))
@pytest.mark.parametrize("value", ["abc", "true", "[1]"])
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(key, value):
    problems = _problems(f"{key}={value}")
    assert len(problems) == 1 and problems[0].startswith(f"{key}: expected "), problems


@pytest.mark.parametrize("key", [k for k in NUMERIC if config_keys(TrainConfig)[k][0] is int])
def test_an_integer_key_refuses_a_fraction(key):
    assert _problems(f"{key}=2.5") == (f"{key}: expected int, got '2.5' (from '{key}=2.5')",)


@pytest.mark.parametrize("key", [k for k in NUMERIC if config_keys(TrainConfig)[k][0] is float])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_float_key_refuses_nan_and_infinity(key, value):
    problems = _problems(f"{key}={value}")
    assert len(problems) == 1 and problems[0].startswith(f"{key}: expected float "), problems


@pytest.mark.parametrize("key", list(CHOICES))
def test_a_choice_key_takes_its_choices_only(key):
    for choice in CHOICES[key]:
        assert not [p for p in _problems(f"{key}={choice}") if p.startswith(f"{key}: expected")], (key, choice)
    listed = ", ".join(repr(c) for c in CHOICES[key])
    assert _problems(f"{key}=nope") == (f"{key}: expected one of {listed}, got 'nope'",)
    section, name = key.split(".")
    with pytest.raises(ConfigError) as err:  # in a TOML file (on the command line, 5 is the text '5')
        load_config(TrainConfig, data={section: {name: 5}})
    assert err.value.problems == (f"{key}: expected str, got int 5",)


@pytest.mark.parametrize("key", FLAGS)
def test_a_flag_takes_true_or_false(key):
    assert _problems(f"{key}=maybe") == (f"{key}: expected bool, got 'maybe' (from '{key}=maybe')",)
    assert _problems(f"{key}=1") == (f"{key}: expected bool, got '1' (from '{key}=1')",)


def test_text_keys():
    assert _problems("train.run_dir=''") == ("train.run_dir: expected a folder for the run's files, got ''",)
    assert _problems("data.paths=[1]")[0].startswith("data.paths: expected tuple[str, ...]")
    assert _problems("data.source=text") == ("data.paths: data.source='text' needs files or glob patterns, got none",)
    assert _problems("data.source=binary", "data.paths=['a', 'b']") == ()  # shards of one stream
    assert _problems("data.val_paths=['v']")[0].startswith("data.val_paths: read with data.source = 'binary' only")
    assert _problems("data.eos_token='<eos>'", "data.source=text", "data.paths=['a']") == (
        "data.eos_token: needs data.tokenizer (byte-level text ends documents with a 0 byte)",)
    assert _problems("train.fp8_backend='cutlass,torch'") == ()
    (problem,) = _problems("train.fp8_backend=cublas")
    assert problem.startswith("train.fp8_backend: backend must be 'auto', one of (") and problem.endswith(
        "or a comma list of them, got 'cublas'"), problem


def test_microbatches_are_refused_before_anything_divides_by_them():
    # the reported failure: parallel.microbatches=0 ended in ZeroDivisionError (TrainConfig splits the batch)
    assert _problems("parallel.microbatches=0") == ("parallel.microbatches: expected int >= 1, got 0",)
    assert _problems("parallel.pp=1", "parallel.microbatches=-4") == (
        "parallel.microbatches: expected int >= 1, got -4",)


def test_sequences_longer_than_the_rotary_tables_are_refused_with_the_remedy():
    assert _problems("data.seq_len=4096") == ()  # the default tables' length
    assert _problems("data.seq_len=4097") == (
        "data.seq_len=4097 exceeds model.max_seq_len=4096, the positions whose rotary tables the model "
        "precomputes: raise model.max_seq_len",)
    assert _problems("data.seq_len=8192", "model.max_seq_len=8192") == ()


@pytest.mark.parametrize("build, key", [
    (lambda: ParallelConfig(microbatches=0), "parallel.microbatches: expected int >= 1, got 0"),
    (lambda: ParallelConfig(pp="2"), "parallel.pp: expected int, got str '2'"),
    (lambda: ModelConfig(dim=True), "model.dim: expected int, got bool True"),
    (lambda: OptimConfig(beta2=1.0), "optim.beta2: expected float >= 0 and < 1, got 1.0"),
    (lambda: DataConfig(seq_len=-1), "data.seq_len: expected int >= 1, got -1"),
    (lambda: RunConfig(dtype="float16"), "train.dtype: expected one of 'float32', 'bfloat16', got 'float16'"),
    (lambda: CheckpointConfig(every=-1), "checkpoint.every: expected int >= 0 (0: only at the end), got -1"),
    (lambda: dataclasses.replace(TrainConfig(), train=RunConfig(global_batch=6)),
     "train.global_batch=6 must split into parallel.dp=1 ranks x parallel.microbatches=4 equal micro-batches"),
])
def test_building_a_config_in_python_checks_the_same(build, key):
    with pytest.raises(ConfigError) as err:
        build()
    assert err.value.problems == (key,)


def test_every_problem_of_one_section_is_listed():
    problems = _problems("model.dim=0", "model.n_heads=-1", "optim.lr=0")
    assert problems == ("model.dim: expected int >= 1, got 0", "model.n_heads: expected int >= 1, got -1",
                        "optim.lr: expected float > 0, got 0.0")


CLI_CASES = [
    (["--parallel.microbatches=0"], {}, "parallel.microbatches: expected int >= 1, got 0"),
    (["--parallel.pp=1", "--parallel.dp=1", "--parallel.microbatches=-1"], {},
     "parallel.microbatches: expected int >= 1, got -1"),
    ([], {"SLURM_NTASKS": "abc"}, "SLURM_NTASKS='abc': expected an integer >= 1"),
    ([], {"PMI_SIZE": "2.5"}, "PMI_SIZE='2.5': expected an integer >= 1"),
    ([], {"TORCHELASTIC_RESTART_COUNT": "-1"}, "TORCHELASTIC_RESTART_COUNT='-1': expected an integer >= 0"),
]


@pytest.mark.parametrize("args, env, line", [CLI_CASES[0], CLI_CASES[2]])
def test_the_command_exits_2_with_one_line_and_no_traceback(args, env, line):
    config = ROOT / "configs" / "tiny_moe.toml"
    proc = subprocess.run([sys.executable, "-m", "dualflow", "train", str(config), *args], capture_output=True,
                          text=True, timeout=120, env={**_clean_env(), **env})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert line in proc.stderr and proc.stdout == "", proc.stderr


@pytest.mark.parametrize("args, env, line", CLI_CASES)
def test_the_command_line_entry_returns_2_with_one_line(args, env, line, capsys, monkeypatch):
    """The same through ``dualflow.cli.main`` in this process (no interpreter start per case)."""
    from dualflow.cli import main

    for name in os.environ.keys() & INT_VARIABLES.keys():  # this process may itself run under a launcher
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = ROOT / "configs" / "tiny_moe.toml"
    assert main(["train", str(config), *args]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(f"dualflow train: {line}" if env else f"dualflow train: {config}: {line}\n"), out.err
    assert len(out.err.strip().splitlines()) == 1 and out.out == "", out


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in INT_VARIABLES}


def test_train_needs_a_config(capsys, tmp_path, monkeypatch):
    from dualflow.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dualflow train: no config given; expected `dualflow train CONFIG.toml`"), err
    assert "tiny_moe.toml" in err and not (tmp_path / "runs").exists()
