"""The cross-core probe of the peer benchmark (scripts/xcore.py)."""
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "scripts"))
import xcore  # noqa: E402


def test_rounds_far_from_the_fastest_round_trip_are_labelled_far():
    assert xcore.placements([60.0, 330.0, None, 140.0], None) == ["near", "far", None, "near"]
    # against the fastest seen earlier in the run: a case whose rounds were all far says so
    assert xcore.placements([330.0, 340.0], 60.0) == ["far", "far"]
    assert xcore.placements([None, None], None) == [None, None]


def test_each_placement_gets_the_medians_of_its_own_rounds():
    samples = {"ours": [1.0, 2.0, 3.0, 10.0], "peer": [2.0, 2.0, 4.0, 12.0]}
    split = xcore.split_medians(samples, ["near", "near", "far", "far"])
    assert split == {"near": {"ours": 1.5, "peer": 2.0}, "far": {"ours": 6.5, "peer": 8.0}}
    assert list(xcore.split_medians(samples, ["near", None, "near", "near"])) == ["near"]


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_probe_builds_once_and_measures_a_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(xcore, "CACHE", str(tmp_path))
    binary, why = xcore.probe_binary()
    assert binary is not None, why
    assert xcore.probe_binary()[0] == binary and len(os.listdir(tmp_path)) == 1  # built once
    ns = xcore.round_trip_ns(binary, trips=2000)
    assert ns is not None and 1.0 < ns < 1e6
