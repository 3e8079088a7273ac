"""The typed TOML configuration: loading, overrides, every kind of mistake reported at once, round trips."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal

import pytest

from dualflow.launcher.config import (
    ConfigError,
    add_config_arguments,
    config_from_args,
    config_keys,
    load_config,
    log_config,
    save_config,
    split_overrides,
    to_dict,
    to_toml,
    tomllib,
    type_name,
)


class Precision(Enum):
    BF16 = "bf16"
    FP8 = "fp8"


@dataclass(frozen=True)
class Optim:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "constant"] = "cosine"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class Parallel:
    pipeline: int = 1
    experts: int = 1


@dataclass(frozen=True)
class Model:
    dim: int = 64
    layers: list[int] = field(default_factory=lambda: [1, 2])
    parallel: Parallel = field(default_factory=Parallel)


@dataclass(frozen=True)
class Job:
    name: str
    steps: int = 10
    out: Path = Path("runs")
    precision: Precision = Precision.BF16
    seed: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    clip: float = 1.0
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_defaults_file_then_overrides(tmp_path):
    path = _write(tmp_path, 'name = "base"\nsteps = 20\n[optim]\nlr = 0.1\n[model.parallel]\npipeline = 4\n')
    cfg = load_config(Job, path, ["--optim.lr=1e-3", "--model.parallel.experts=8", "steps=30"])
    assert cfg == Job(name="base", steps=30, model=Model(parallel=Parallel(pipeline=4, experts=8)),
                      optim=Optim(lr=1e-3))
    assert load_config(Job, path).optim.lr == 0.1


def test_override_values_are_typed_by_the_field():
    cfg = load_config(Job, overrides=[
        "--name=1",  # a str field keeps the text
        "--out=/tmp/x y", "--precision=fp8", "--seed=7", "--tags={a = \"b\"}", "--clip=2",  # int -> float
        "--model.layers=[3, 4, 5]", "--optim.betas=[0.8, 0.9]", "--optim.schedule=constant",
    ])
    assert cfg == Job(name="1", out=Path("/tmp/x y"), precision=Precision.FP8, seed=7, tags={"a": "b"}, clip=2.0,
                      model=Model(layers=[3, 4, 5]), optim=Optim(betas=(0.8, 0.9), schedule="constant"))
    assert isinstance(cfg.clip, float) and isinstance(cfg.optim.betas, tuple)
    assert load_config(Job, data={"name": "x", "seed": 3}, overrides=["--seed=none"]).seed is None
    assert load_config(Job, overrides=["--name=none"]).name == "none"  # not optional: the text


def test_every_problem_is_reported_at_once(tmp_path):
    path = _write(tmp_path, 'stepz = 5\nclip = "big"\nmodel = 3\n[optim]\nlr = true\nbeta = [1]\n')
    with pytest.raises(ConfigError) as err:
        load_config(Job, path, ["--optim.lrr=1", "--steps=1.5", "--optim=1", "--precision=fp16", "--x.y.z=1",
                                "--steps.x=1", "noequals"])
    problems = err.value.problems
    expected = [
        "unknown key 'optim.lrr' in [optim] (did you mean 'optim.lr'?); valid keys: optim.betas, optim.lr, "
        "optim.schedule",
        "steps: expected int, got '1.5'",
        "optim is a section; set its keys instead: optim.lr, optim.betas, optim.schedule",
        "precision: expected 'bf16' | 'fp8', got 'fp16'",
        "unknown key 'x.y.z' in the top level",
        "steps is a key of type int, not a section",
        "override 'noequals' is not --section.key=value",
        "unknown key 'stepz' in the top level (did you mean 'steps'?); valid keys: clip, model, name, optim, out, "
        "precision, seed, steps, tags",
        "name: required (str), not set",
        "clip: expected float, got str 'big'",
        "model: is a section (table) of keys model.dim, model.layers, model.parallel, got int 3",
        "unknown key 'optim.beta' in [optim] (did you mean 'optim.betas'?)",
        "optim.lr: expected float, got bool True",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for want, got in zip(expected, problems):
        assert got.startswith(want), f"{got!r} does not start with {want!r}"
    assert str(path) in str(err.value) and "13 problem(s)" in str(err.value)


@pytest.mark.parametrize("data, problem", [
    ({"name": "x", "steps": True}, "steps: expected int, got bool True"),
    ({"name": "x", "optim": {"betas": [0.9]}}, "optim.betas: expected tuple[float, float], got list [0.9]"),
    ({"name": "x", "model": {"layers": [1, "2"]}}, "model.layers: expected list[int]"),
    ({"name": "x", "tags": {"a": 1}}, "tags: expected dict[str, str]"),
    ({"name": 5}, "name: expected str, got int 5"),
    ({"name": "x", "optim": {"lr": -1.0}}, "[optim]: lr must be > 0, got -1.0"),  # the dataclass's own check
    ({"name": "x", "seed": 1.5}, "seed: expected int | None, got float 1.5"),
])
def test_wrong_types(data, problem):
    with pytest.raises(ConfigError) as err:
        load_config(Job, data=data)
    assert err.value.problems == (problem,) or err.value.problems[0].startswith(problem), err.value.problems


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(Job, tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Job, _write(tmp_path, "name = \n"))
    with pytest.raises(TypeError, match="dataclass"):
        load_config(dict)


def test_toml_round_trip_with_awkward_values(tmp_path):
    cfg = Job(name='quote " backslash \\ newline \n tab \t unicode é ☃ [x]', steps=-3, out=Path("a b/c"),
              precision=Precision.FP8, tags={"key with space": "v", "k": ""}, clip=float("inf"),
              model=Model(dim=0, layers=[], parallel=Parallel(pipeline=2**40)), optim=Optim(lr=1e-300, betas=(-0.0, 1)))
    path = save_config(cfg, tmp_path / "sub" / "config.toml")
    again = load_config(Job, path)
    assert again == cfg and math.copysign(1, again.optim.betas[0]) == -1
    assert tomllib.loads(to_toml(cfg))["model"]["parallel"] == {"pipeline": 2**40, "experts": 1}
    assert "# seed = none" in to_toml(cfg)  # None is an absent key
    assert to_dict(cfg)["precision"] == "fp8" and to_dict(cfg)["out"] == "a b/c"
    nan = load_config(Job, data={"name": "x", "clip": float("nan")})
    assert math.isnan(load_config(Job, data=tomllib.loads(to_toml(nan))).clip)


def test_keys_and_type_names():
    keys = config_keys(Job)
    assert list(keys)[:3] == ["name", "steps", "out"] and "model.parallel.experts" in keys
    assert keys["optim.lr"] == (float, 3e-4)
    assert type_name(keys["seed"][0]) == "int | None"
    assert type_name(keys["optim.schedule"][0]) == "'cosine' | 'constant'"
    assert type_name(keys["optim.betas"][0]) == "tuple[float, float]"


def test_split_overrides():
    overrides, rest = split_overrides(Job, ["--optim.lr", "3", "--steps=4", "--other", "x", "--typo.key=1", "pos",
                                            "--name"])
    assert overrides == ["optim.lr=3", "steps=4", "typo.key=1", "name"]
    assert rest == ["--other", "x", "pos"]


def test_argparse_integration(capsys):
    parser = argparse.ArgumentParser(prog="job")
    add_config_arguments(parser, Job)
    cfg = config_from_args(Job, parser.parse_args(["--name", "n", "--optim.lr=0.5", "--model.layers", "[9]"]))
    assert cfg == Job(name="n", optim=Optim(lr=0.5), model=Model(layers=[9]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--optim.l=0.5"])  # no prefix matching of keys
    err = capsys.readouterr().err
    assert "unrecognized arguments: --optim.l=0.5" in err
    assert "unknown key 'optim.l'" in err and "did you mean 'optim.lr'" in err


def test_log_config_prints_once_and_saves_beside_the_logs(tmp_path, monkeypatch, capsys):
    cfg = Job(name="x")
    monkeypatch.setenv("DUALFLOW_LOG_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert log_config(cfg) is None and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    path = log_config(cfg)
    assert path == tmp_path / "config.toml" and load_config(Job, path) == cfg
    assert capsys.readouterr().out.count('name = "x"') == 1
