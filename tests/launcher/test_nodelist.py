"""SLURM nodelist and tasks-per-node expansion, by hand-written cases and against scontrol itself."""

from __future__ import annotations

import subprocess

import pytest

from dualflow.launcher.nodelist import expand_nodelist, expand_tasks_per_node, hostnames

CASES = {
    "node1": ["node1"],
    "a,b,c": ["a", "b", "c"],
    "gpu[01-04,07],cpu-a[1-2]": ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu-a1", "cpu-a2"],
    "n[8-11]": ["n8", "n9", "n10", "n11"],
    "n[08-11]": ["n08", "n09", "n10", "n11"],
    "n[9-011]": ["n9", "n10", "n11"],  # the lower bound sets the width
    "n[001-3]": ["n001", "n002", "n003"],
    "n[3,1,2]": ["n3", "n1", "n2"],  # SLURM's order is kept
    "rack[1-2]node[01-02]": ["rack1node01", "rack1node02", "rack2node01", "rack2node02"],
    "a[01-3,7,010-011]": ["a01", "a02", "a03", "a7", "a010", "a011"],
    "x[1-2],x1": ["x1", "x2", "x1"],
    "a,,b": ["a", "b"],
    "[1-2]": ["1", "2"],
    "dgx-h100-[000-002]": ["dgx-h100-000", "dgx-h100-001", "dgx-h100-002"],
    "ip-10-0-0-[5-6],login": ["ip-10-0-0-5", "ip-10-0-0-6", "login"],
    "c[1-1]": ["c1"],
}
# Accepted here although SLURM 22.05 refuses them (newer SLURM accepts a suffix after the brackets).
SUFFIXES = {"n[1-2]-ib": ["n1-ib", "n2-ib"], "a-[0001-0002].ib": ["a-0001.ib", "a-0002.ib"]}
BAD = ["", " ", "a[", "a]", "a[1-2", "a[[1]]", "a[]", "a[2-1]", "a[x]", "a[1-2,]", "a[1--2]"]


@pytest.mark.parametrize("nodelist, hosts", list(CASES.items()) + list(SUFFIXES.items()))
def test_expand(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", BAD)
def test_malformed_lists_are_refused(nodelist):
    with pytest.raises(ValueError, match="nodelist"):
        expand_nodelist(nodelist)


def test_large_range():
    hosts = expand_nodelist("gpu[0001-1024]")
    assert len(hosts) == 1024 and hosts[0] == "gpu0001" and hosts[-1] == "gpu1024" and len(set(hosts)) == 1024


@pytest.mark.parametrize("spec, tasks", [("1", [1]), ("8(x4)", [8, 8, 8, 8]), ("2(x3),1", [2, 2, 2, 1]),
                                         ("4,2(x2),8", [4, 2, 2, 8])])
def test_tasks_per_node(spec, tasks):
    assert expand_tasks_per_node(spec) == tasks


@pytest.mark.parametrize("spec", ["", "x", "2(3)", "2(x)", "-1"])
def test_tasks_per_node_malformed(spec):
    with pytest.raises(ValueError, match="tasks-per-node"):
        expand_tasks_per_node(spec)


def test_same_answers_as_scontrol(slurm):
    for nodelist in CASES:
        res = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=slurm.env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert expand_nodelist(nodelist) == res.stdout.split(), nodelist


def test_hostnames_falls_back_to_the_parser_when_scontrol_cannot_answer(tmp_path):
    # No slurm.conf: scontrol would retry for a minute; the timeout cuts it short.
    env = {"SLURM_CONF": str(tmp_path / "missing.conf"), "PATH": "/usr/bin:/bin"}
    assert hostnames("gpu[01-02],cpu", environ=env, timeout=2) == ["gpu01", "gpu02", "cpu"]


def test_hostnames_prefers_scontrol(slurm):
    # SLURM takes "a]" for a host name; the parser refuses it: the answer shows who answered.
    assert hostnames("a]", environ=slurm.env) == ["a]"]
    assert hostnames("n[1-2]x[3-4]", environ=slurm.env) == ["n1x3", "n1x4", "n2x3", "n2x4"]
