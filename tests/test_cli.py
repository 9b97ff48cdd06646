"""The commands around tuning records: `logs check|repair`, `schedules`, and the one warning
`import` gives when sparse kernels have no record; `import --profile`."""
import os

import numpy as np
import pytest
import torch

import fscnn_tvm
from fscnn_tvm import records
from fscnn_tvm.cli import main as cli
from fscnn_tvm.target import mcpu_lanes, resolve_target
from fscnn_tvm.tuning_log import RECORDS, WORKLOADS


def _snapshot(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def test_logs_check_changes_nothing_and_repair_keeps_the_originals(default_log, capsys):
    with open(os.path.join(default_log, RECORDS), "a") as f:
        f.write("null\nthis is not json\n")
    before = _snapshot(default_log)
    assert cli(["logs", "check", default_log]) == 1
    out = capsys.readouterr().out
    assert f"{os.path.join(default_log, RECORDS)}: 2 damaged line(s): 4, 5" in out and WORKLOADS not in out
    assert _snapshot(default_log) == before
    assert cli(["logs", "repair", default_log]) == 0
    assert "originals are kept as *.bad" in capsys.readouterr().out
    after = _snapshot(default_log)
    assert after[RECORDS + ".bad"] == before[RECORDS] and after[WORKLOADS] == before[WORKLOADS]
    assert after[RECORDS].splitlines() == before[RECORDS].splitlines()[:3]
    assert cli(["logs", "check", default_log]) == 0
    assert "every line loads" in capsys.readouterr().out
    missing = os.path.join(default_log, "missing")
    assert cli(["logs", "check", missing]) == 2
    assert f"{missing} is not a directory" in capsys.readouterr().err


def test_schedules_lists_the_shipped_sets_and_which_apply_here(capsys):
    assert cli(["schedules"]) == 0
    out = capsys.readouterr().out
    lanes = mcpu_lanes(str(resolve_target(None).attrs.get("mcpu", "")))
    for s in records.shipped_sets():
        [row] = [line for line in out.splitlines() if line.startswith(s.name + " ")]
        assert s.tuned_on in row and s.mcpu in row
        assert row.endswith("yes" if s.lanes == lanes else "no")
    assert f"({lanes} float32 lanes)" in out
    assert cli(["schedules", "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_import_warns_once_with_the_command_that_tunes_the_model(small_model, tmp_path, caplog):
    model, x, _ = small_model
    program = str(tmp_path / "small.pt2")
    torch.export.save(torch.export.export(model, (x,)), program)
    with caplog.at_level("WARNING", logger="fscnn_tvm"):
        assert cli(["import", "--program", program, "--no-measure", "--time", "0",
                    "--out", str(tmp_path / "small.so")]) == 0
    [message] = [r.getMessage() for r in caplog.records if "have no tuned record" in r.getMessage()]
    assert message.endswith(f"Tune them with: fscnn-tvm tune --program {program} --no-measure "
                            f"--log tuning_logs/small, then add --tuning-log tuning_logs/small")


def test_import_profiles_on_request(small_model, tmp_path, capsys):
    model, x, _ = small_model
    program = str(tmp_path / "small.pt2")
    torch.export.save(torch.export.export(model, (x,)), program)
    assert cli(["import", "--program", program, "--no-measure", "--time", "0", "--profile", "2",
                "--out", str(tmp_path / "small.so")]) == 0
    out = capsys.readouterr().out
    table = out[out.index("where the time goes"):].splitlines()[1:3]
    assert len(table) == 2 and all(" ms " in line and " %  x" in line for line in table)
    with pytest.raises(SystemExit):
        cli(["import", "--program", program, "--profile", "0"])


@pytest.mark.slow  # a whole zoo model
def test_import_with_a_dynamic_batch_writes_one_library_for_the_range(tmp_path, capsys):
    out = str(tmp_path / "r.so")
    assert cli(["import", "--model", "vgg16_cifar", "--sparsity", "0.9", "--no-measure",
                "--time", "0", "--batch", "3", "--dynamic-batch", "1,4", "--out", out]) == 0
    assert "output matches PyTorch" in capsys.readouterr().out
    loaded = fscnn_tvm.load(out)
    assert loaded.batch_range == (1, 4)
    for batch in (1, 4):
        assert loaded(np.zeros((batch, 3, 32, 32), np.float32)).shape == (batch, 10)
    with pytest.raises(ValueError, match="outside the range"):
        loaded(np.zeros((5, 3, 32, 32), np.float32))
