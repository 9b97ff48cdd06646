"""Tuning jobs with small budgets: tuned kernels stay correct, logs resume, survive a kill and
corruption, and candidates can be measured through a TVM RPC tracker on loopback."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import resources

import numpy as np
import pytest
import torch
import tvm_ffi

import fscnn_tvm
from fscnn_tvm import prune, records, tuning

pytestmark = pytest.mark.slow
RECORDS = "database_tuning_record.json"


def _check(compiled, model, x):
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(compiled(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _tuned(tmp_path, fmt, model, x):
    imported = fscnn_tvm.import_torch(model, (x,), fmt=fmt, block=(4, 1) if fmt == "bsr" else None, measure=False)
    assert len(imported.kernels) == 3 and all(r.rewritten for r in imported.report)
    log_dir = str(tmp_path / "log")
    return model, x, imported, log_dir, tuning.tune(imported, trials=8, log_dir=log_dir, dense=False)


@pytest.fixture(scope="module")
def csr_log(tmp_path_factory, small_model):
    """One small CSR tuning job, shared by the tests that only read its log (or copy it)."""
    return _tuned(tmp_path_factory.mktemp("csr"), "csr", *small_model[:2])


def _check_tuned(model, x, imported, log_dir, result, tmp_path):
    assert all(n > 0 for n in result.records.values()), result.records  # every kernel was measured
    # Exactly the budget: 3 default schedules, then 5 trials in batches of 4 (the task scheduler
    # alone would have measured a whole second batch: 11 records).
    assert sum(result.records.values()) == 8, result.records
    rows = result.summary(imported.target)
    assert all(np.isfinite(r["best_ms"]) and r["best_ms"] > 0 for r in rows)
    # The default schedule was measured and recorded too: the search starts from it, and the
    # best record can never be slower than running without a log.
    db = tuning.open_database(log_dir)
    tasks = tuning.extract_tasks(imported, str(tmp_path / "args"), dense=False)
    for task in tasks:
        default = str(fscnn_tvm.schedule.default_schedule(task.mod["main"], task.spec).trace)
        found = db.get_top_k(db.commit_workload(task.mod), 10**6)
        assert any(str(r.trace) == default for r in found), task.name
    # Each kernel's best record under its width class too (other patterns of its shapes find it).
    classes = {records.width_class(t.spec) for t in tasks} - {t.spec for t in tasks}
    assert all(len(records.workload_records(db, records.workload(c))) == 1 for c in classes)

    def lines():
        with open(os.path.join(log_dir, RECORDS)) as f:  # TVM's own JSON database format
            return sum(1 for line in f if line.strip())
    assert lines() == sum(result.records.values()) + len(classes)
    _check(fscnn_tvm.compile(imported, tuning_log=log_dir), model, x)
    # The same budget again: nothing left to tune, no new records.
    again = tuning.tune(imported, trials=8, log_dir=log_dir, dense=False)
    assert again.records == result.records and lines() == sum(result.records.values()) + len(classes)


def test_tuned_csr_kernels_match_pytorch_and_the_log_is_reused(csr_log, tmp_path):
    _check_tuned(*csr_log, tmp_path)


def test_tuned_bsr_kernels_match_pytorch_and_the_log_is_reused(tmp_path, small_model):
    _check_tuned(*_tuned(tmp_path, "bsr", *small_model[:2]), tmp_path)


def test_the_search_starts_from_the_shipped_record(csr_log, tmp_path, monkeypatch):
    """A kernel the shipped records cover (here: a stand-in set holding one tuned record of the
    small model's first kernel) has that record measured on its own arrays and recorded before
    the search, beside its default schedule: the search starts from it, and the log's best is
    never slower than what compile runs without the log."""
    from tvm.s_tir import meta_schedule as ms
    _, _, imported, log_dir, _ = csr_log
    tasks = tuning.extract_tasks(imported, str(tmp_path / "args"), dense=False)
    db = tuning.open_database(log_dir)
    task, tuned = next((t, r) for t in tasks for r in records.workload_records(db, t.mod)
                       if str(r.trace) != str(fscnn_tvm.schedule.default_schedule(t.mod["main"], t.spec).trace))
    shipped = ms.database.MemoryDatabase()
    shipped.commit_tuning_record(ms.database.TuningRecord(
        tuned.trace, shipped.commit_workload(task.mod), tuned.run_secs, tuned.target, tuned.args_info))
    monkeypatch.setattr(tuning, "shipped_database", lambda target: shipped)
    fresh = str(tmp_path / "fresh")
    result = tuning.tune(imported, trials=6, log_dir=fresh, dense=False)
    assert sum(result.records.values()) == 6  # 3 defaults + the shipped record, then 2 trials
    found = [str(r.trace) for r in records.workload_records(tuning.open_database(fresh), task.mod)]
    assert str(tuned.trace) in found and len(found) >= 2


def test_a_task_stops_once_its_search_has_converged():
    """A task whose candidates have not beaten its best (its starting records included) by
    CONVERGED_GAIN for PATIENCE_TRIALS in a row asks for no more; a gain restarts the count;
    failed candidates count as no gain."""
    from types import SimpleNamespace
    progress = tuning.Convergence(best=1.0)
    progress.update([0.995] * (tuning.PATIENCE_TRIALS - 1))  # under 1 %: no gain
    assert not progress.converged
    progress.update([0.9])
    assert progress.best == 0.9 and progress.stale == 0
    progress.update([float("inf")] * tuning.PATIENCE_TRIALS)
    assert progress.converged

    class Search:
        def generate_measure_candidates(self):
            return ["a", "b", "c", "d"]

        def notify_runner_results(self, candidates, results):
            pass
    budget = [1000]
    strategy = tuning.Budgeted(Search(), budget)._inst
    strategy.progress = tuning.Convergence(best=1.0)
    slow = [SimpleNamespace(error_msg=None, run_secs=[2.0])] * 4
    asked = 0
    while (batch := strategy.generate_measure_candidates()) is not None:
        asked += len(batch)
        strategy.notify_runner_results(batch, slow[:len(batch)])
    assert asked == tuning.PATIENCE_TRIALS and budget == [1000 - asked]


def test_dense_tasks_are_tuned_and_applied(tmp_path, small_model):
    model, x, _ = small_model
    imported = fscnn_tvm.import_torch(model, (x,), sparsity_threshold=1.0)  # everything dense
    # Our dense kernel runs the convs and the linear (a 1x1 conv on a 1x1 image).
    assert set(imported.kernels) == {"dense_conv2d_0", "dense_conv2d_1", "dense_linear_2"}
    tasks = tuning.extract_tasks(imported, str(tmp_path / "args"))
    assert {t.name for t in tasks} == set(imported.kernels)  # our design spaces; no op left to TVM's rules
    log_dir = str(tmp_path / "log")
    result = tuning.tune(imported, trials=4, log_dir=log_dir)
    assert sum(result.records.values()) > 0
    _check(fscnn_tvm.compile(imported, tuning_log=log_dir), model, x)


def _bad_lines(good_line):
    """Lines a log can end up with: cut off, not JSON, JSON of the wrong shape or types, a
    record of a workload that is not there, a trace TVM cannot apply."""
    index, (trace, secs, target, args) = json.loads(good_line)
    record = lambda *r: json.dumps([index, list(r)])  # noqa: E731
    return ["this is not json", good_line[: len(good_line) // 2], '{"workload": 0}', "null", "[0]", "[0, [1, 2]]",
            json.dumps([str(index), [trace, secs, target, args]]), json.dumps([99, [trace, secs, target, args]]),
            record(trace, "fast", target, args), record(trace, secs, 5, args), record(trace, secs, target, [5]),
            record(trace, secs, target, args).replace(json.dumps(secs[0]), "NaN", 1),
            record([[["NoSuchInstruction", [], [], []]], []], secs, target, args),
            record(trace, secs, {"kind": "no-such-target"}, args)]


def _snapshot(directory):
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory)) if os.path.isfile(os.path.join(directory, name))}


def test_damaged_log_lines_are_left_out_and_a_log_that_is_only_read_is_not_rewritten(csr_log, tmp_path, caplog):
    import shutil
    model, x, imported, tuned_dir, _ = csr_log
    log_dir = str(tmp_path / "log")
    shutil.copytree(tuned_dir, log_dir)
    path = os.path.join(log_dir, RECORDS)
    with open(path) as f:
        good = [line for line in f if line.strip()]
    bad = _bad_lines(good[0].strip())
    with open(path, "a") as f:
        f.writelines(line + "\n" for line in bad)
    before = _snapshot(log_dir)
    # Read-only (root ignores the mode bits, hence the snapshot: compile must not write either way).
    for p in [path, os.path.join(log_dir, "database_workload.json"), log_dir]:
        os.chmod(p, 0o555 if p == log_dir else 0o444)
    try:
        with caplog.at_level("WARNING", logger="fscnn_tvm.tuning"):
            compiled = fscnn_tvm.compile(imported, tuning_log=log_dir)
            fscnn_tvm.compile(imported, tuning_log=log_dir)
    finally:
        os.chmod(log_dir, 0o755)
    warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(warnings) == 1 and f"{len(bad)} line(s) left out" in warnings[0], warnings  # once per log
    _check(compiled, model, x)
    assert _snapshot(log_dir) == before
    # A tuning job opens the log to write: it rewrites it without the bad lines, keeps the original.
    os.chmod(path, 0o644)
    os.chmod(os.path.join(log_dir, "database_workload.json"), 0o644)
    tuning.open_database(log_dir, write=True)
    with open(path) as f:
        assert f.readlines() == good
    assert _snapshot(log_dir)[RECORDS + ".bad"] == before[RECORDS]


def test_records_follow_their_workload_lines_and_a_missing_workload_file_is_named(tmp_path, small_model):
    import shutil
    from tvm.s_tir import meta_schedule as ms
    log_dir = str(tmp_path / "log")
    with resources.as_file(records.SHIPPED / "resnet18_s90_avx2") as shipped:
        shutil.copytree(shipped, log_dir)
    workloads = os.path.join(log_dir, "database_workload.json")

    def workload_of_each_trace(db):
        return {str(r.trace): tvm_ffi.structural_hash(r.workload.mod) for r in db.get_all_tuning_records()}

    expected = workload_of_each_trace(ms.database.JSONDatabase(work_dir=log_dir))
    with open(workloads) as f:
        lines = f.readlines()
    lost = ms.database.Workload.from_json(json.loads(lines[2])).mod
    lines[2] = '{"not": "a workload"}\n'  # the records of this workload go; the later ones are renumbered
    with open(workloads, "w") as f:
        f.writelines(lines)
    for write in (False, True):
        loaded = workload_of_each_trace(tuning.open_database(log_dir, write=write))
        assert loaded == {t: h for t, h in expected.items() if h != tvm_ffi.structural_hash(lost)}
        assert 0 < len(loaded) < len(expected)
    os.remove(workloads)
    model, x, _ = small_model
    imported = fscnn_tvm.import_torch(model, (x,), measure=False)
    with pytest.raises(FileNotFoundError, match="database_workload.json is missing"):
        fscnn_tvm.compile(imported, tuning_log=log_dir)
    with pytest.raises(FileNotFoundError, match="database_workload.json is missing"):
        tuning.tune(imported, trials=4, log_dir=log_dir)


KILL_SCRIPT = """
import sys, torch, fscnn_tvm
from fscnn_tvm import prune, records, tuning
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Conv2d(16, 16, 3, padding=1)).eval()
prune.prune_magnitude(model, 0.85, keep_first_conv_dense=False)
imported = fscnn_tvm.import_torch(model, (torch.randn(1, 8, 10, 10),), fmt="csr", measure=False)
tuning.tune(imported, trials=400, log_dir=sys.argv[1], dense=False, trials_per_iter=4)
"""


def _kill_script_model():
    """KILL_SCRIPT's model and input, imported here."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1)).eval()
    prune.prune_magnitude(model, 0.85, keep_first_conv_dense=False)
    x = torch.randn(1, 8, 10, 10)
    return model, x, fscnn_tvm.import_torch(model, (x,), fmt="csr", measure=False)


def test_a_killed_job_keeps_its_records_and_resumes(tmp_path):
    log_dir = str(tmp_path / "log")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, log_dir], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    path = os.path.join(log_dir, RECORDS)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if os.path.exists(path) and sum(1 for _ in open(path)) >= 6:
                break
            assert proc.poll() is None, "the tuning job ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("no records written within 300 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    lines = [line for line in open(path) if line.strip()]
    kept = 0
    for line in lines:
        try:
            json.loads(line)
            kept += 1
        except json.JSONDecodeError:
            pass  # at most the line being written at the kill
    assert kept >= 6 and kept >= len(lines) - 1
    model, x, imported = _kill_script_model()
    resumed = tuning.tune(imported, trials=kept, log_dir=log_dir, dense=False)
    assert sum(resumed.records_before.values()) == kept  # nothing lost, nothing re-tuned
    assert resumed.records == resumed.records_before
    _check(fscnn_tvm.compile(imported, tuning_log=log_dir), model, x)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_servers(port, key, count, timeout=120):
    from tvm import rpc
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            summary = rpc.connect_tracker("127.0.0.1", port).summary()
            free = sum(v["free"] for k, v in summary.get("queue_info", {}).items() if k == key)
            if free >= count:
                return
        except Exception:  # noqa: BLE001 - tracker still starting
            pass
        time.sleep(0.5)
    pytest.fail(f"{count} RPC servers did not register with the tracker within {timeout} s")


def _start_tracker_and_servers(count):
    port, key = _free_port(), "fscnn-test"
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                               "--port", str(port), "--port-end", str(port + 1)], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(2)
    for _ in range(count):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", key,
             "--host", "127.0.0.1"], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    _wait_for_servers(port, key, count)
    return port, key, procs


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


RPC_SCRIPT = KILL_SCRIPT.replace("trials=400, log_dir=sys.argv[1], dense=False, trials_per_iter=4",
                                 "trials=8, log_dir=sys.argv[1], dense=False, trials_per_iter=4, "
                                 "rpc=(sys.argv[2], sys.argv[3])")


def test_rpc_measurement_goes_on_when_a_server_dies_mid_job(tmp_path):
    """Candidates measured on servers registered with a loopback tracker; one of the two dies
    after the first records, the job finishes on the other, and its records apply."""
    port, key, procs = _start_tracker_and_servers(2)
    log_dir = str(tmp_path / "log")
    try:
        job = subprocess.Popen([sys.executable, "-c", RPC_SCRIPT, log_dir, f"127.0.0.1:{port}", key],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        procs.append(job)
        path = os.path.join(log_dir, RECORDS)
        deadline = time.time() + 300
        while not (os.path.exists(path) and sum(1 for _ in open(path)) >= 4):
            assert job.poll() is None, job.stdout.read()[-2000:]
            assert time.time() < deadline, "no records within 300 s"
            time.sleep(0.5)
        os.killpg(procs[1].pid, signal.SIGKILL)  # one of the two servers dies mid-job
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output[-3000:]
        records = [line for line in open(path) if line.strip()]
        assert len(records) >= 8  # the job went on and finished its budget on the remaining server
    finally:
        _stop(procs)
    model, x, imported = _kill_script_model()
    _check(fscnn_tvm.compile(imported, tuning_log=log_dir), model, x)


def test_bad_arguments(tmp_path, small_model):
    model, x, _ = small_model
    imported = fscnn_tvm.import_torch(model, (x,), measure=False)
    for bad in (0, -5, 2.5, "10"):
        with pytest.raises(ValueError, match="trials"):
            tuning.tune(imported, trials=bad, log_dir=str(tmp_path / "log"))
    with pytest.raises(FileNotFoundError, match="tuning_log"):
        fscnn_tvm.compile(imported, tuning_log=str(tmp_path / "missing"))


def test_log_dir_that_is_a_file_or_none_is_named(tmp_path, capsys, small_model):
    from fscnn_tvm.cli import main as cli
    model, x, _ = small_model
    imported = fscnn_tvm.import_torch(model, (x,), measure=False)
    a_file = tmp_path / "log.txt"
    a_file.write_text("not a directory")
    for bad in (str(a_file), None, ""):
        with pytest.raises(ValueError, match="log_dir"):
            tuning.tune(imported, trials=4, log_dir=bad)
    program = str(tmp_path / "small.pt2")
    torch.export.save(torch.export.export(model, (x,)), program)
    assert cli(["tune", "--program", program, "--trials", "4", "--log", str(a_file), "--no-measure"]) == 2
    assert f"log_dir: {a_file} is a file" in capsys.readouterr().err


def _answer_wrongly(listening):
    conn, _ = listening.accept()
    with conn:
        conn.recv(4)
        conn.sendall(b"HTTP")


def test_rpc_form_port_and_an_unreachable_tracker_fail_before_tuning(tmp_path, capsys, small_model):
    from fscnn_tvm.cli import main as cli
    model, x, _ = small_model
    imported = fscnn_tvm.import_torch(model, (x,), measure=False)
    log_dir = str(tmp_path / "log")
    with pytest.raises(ValueError, match=r'expected a \("host:port", key\) pair'):
        tuning.tune(imported, trials=4, log_dir=log_dir, rpc="127.0.0.1:9190")
    for address in ("127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1", ":9190"):
        with pytest.raises(ValueError, match="port in 1-65535"):
            tuning.tune(imported, trials=4, log_dir=log_dir, rpc=(address, "fscnn"))
    with socket.socket() as listening:  # something answers on this port, not a tracker
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        with pytest.raises(tuning.TuningError, match="is not a TVM RPC tracker"):
            threading.Thread(target=_answer_wrongly, args=(listening,), daemon=True).start()
            tuning.tune(imported, trials=4, log_dir=log_dir, rpc=(f"127.0.0.1:{listening.getsockname()[1]}", "k"))
    port = _free_port()
    start = time.time()
    with pytest.raises(tuning.TuningError, match=f"no TVM RPC tracker answers at 127.0.0.1:{port}"):
        tuning.tune(imported, trials=4, log_dir=log_dir, rpc=(f"127.0.0.1:{port}", "fscnn"))
    assert time.time() - start < 10 and not os.path.exists(os.path.join(log_dir, RECORDS))
    program = str(tmp_path / "small.pt2")
    torch.export.save(torch.export.export(model, (x,)), program)
    assert cli(["tune", "--program", program, "--log", log_dir, "--rpc", "127.0.0.1:0", "--no-measure"]) == 2
    assert "port in 1-65535, got '127.0.0.1:0'" in capsys.readouterr().err


def test_cli_tune_tunes_the_sparse_module_and_the_dense_one_it_is_compared_against(tmp_path, capsys, small_model):
    from fscnn_tvm.cli import main as cli
    model, x, _ = small_model
    program = str(tmp_path / "small.pt2")
    torch.export.save(torch.export.export(model, (x,)), program)
    log_dir = str(tmp_path / "log")
    assert cli(["tune", "--program", program, "--trials", "5", "--log", log_dir, "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "tuning the dense module's conv/matmul ops" in out and "best_ms" in out
    db = tuning.open_database(log_dir)
    sparse = fscnn_tvm.import_torch(torch.export.load(program), (x,), measure=False)
    baseline = fscnn_tvm.import_torch(torch.export.load(program), (x,), sparse=False)
    for imported in (sparse, baseline):
        counts = {t.name: len(records.workload_records(db, t.mod))
                  for t in tuning.extract_tasks(imported, str(tmp_path / "args"), dense=imported is baseline)}
        assert counts and all(n > 0 for n in counts.values()), counts
