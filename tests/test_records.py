"""Records: each kernel finds its best record, logs ship as sets that apply to CPUs of their SIMD
width, shipped sets load from a directory or a zip and are never written, and a compile whose
sparse kernels have no record warns once with the command that tunes them."""
import json
import os
import shutil
import zipfile
from importlib import resources

import numpy as np
import pytest
import torch
import tvm
from tvm.s_tir import meta_schedule as ms

import fscnn_tvm
from fscnn_tvm import dense, formats, kernels, ops, records, schedule
from fscnn_tvm.decisions import SampledDecisions
from fscnn_tvm.layer import _build
from fscnn_tvm.target import resolve_target
from fscnn_tvm.tuning_log import RECORDS, open_database

UNTUNED = "have no tuned record"


def test_each_kernel_gets_its_best_record_or_its_default(small_model, default_log):
    _, _, imported = small_model
    db = open_database(default_log)
    for kernel in imported.kernels.values():
        sch, tuned = records.best_schedule(kernel.spec, db)
        assert tuned and records.has_trace(db, records.workload(kernel.spec), sch.trace)
        assert len(records.workload_records(db, records.workload(kernel.spec))) == 1
    assert records.schedule_kernels(imported, db)[1] == []
    assert records.schedule_kernels(imported)[1] == list(imported.kernels)
    assert records.sparse_kernels(imported) == list(imported.kernels)  # two convs and the linear


def test_shipped_sets_apply_on_cpus_of_their_simd_width_only(small_model, default_log, tmp_path, caplog):
    _, _, imported = small_model
    shipped = tmp_path / "schedules"
    count = records.ship(default_log, str(shipped / "small"), imported.target, "--program small.pt2")
    assert count == 3  # the best record of each of the three kernels
    mcpu = str(imported.target.attrs.get("mcpu", ""))
    [listed] = records.shipped_sets(shipped)
    assert (listed.name, listed.mcpu, listed.tuned_on, listed.records) == ("small", mcpu, "--program small.pt2", 3)
    db = records._shipped(mcpu, shipped)
    assert db is not None
    assert records.schedule_kernels(imported, db)[1] == []
    # Records apply to every CPU of the same SIMD width (AVX-512 records on any AVX-512 CPU, ...).
    same_width = {"znver4": "skylake-avx512", "znver3": "haswell"}.get(mcpu)
    if same_width:
        assert records._shipped(same_width, shipped) is not None
    with caplog.at_level("WARNING", logger="fscnn_tvm"):
        assert records._shipped("some-other-cpu", shipped) is None
    assert "were tuned for" in caplog.text and "ignored" in caplog.text


def _snapshot(directory):
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(directory) for f in files}


def test_shipped_sets_load_from_a_directory_or_a_zip_and_are_never_written(tmp_path, caplog):
    """A damaged line in a shipped set is left out with one warning; the set's files stay as they
    are, read-only or not (root ignores the mode bits, hence the snapshot)."""
    sets = tmp_path / "schedules"
    with resources.as_file(records.SHIPPED / "vgg16_cifar_s90_avx2") as shipped:
        shutil.copytree(shipped, sets / "vgg16_cifar_s90_avx2")
    with open(sets / "vgg16_cifar_s90_avx2" / RECORDS, "a") as f:
        f.write("null\n")
    archive = tmp_path / "package.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in _snapshot(sets).items():
            z.writestr(f"fscnn_tvm/schedules/{name}", data)
    before = _snapshot(sets)
    for path in [*(p for p in sets.rglob("*") if p.is_file()), *(p for p in sets.rglob("*") if p.is_dir()), sets]:
        os.chmod(path, 0o444 if path.is_file() else 0o555)
    try:
        with caplog.at_level("WARNING", logger="fscnn_tvm"):
            from_dir = records._shipped("znver3", sets)
            from_zip = records._shipped("znver3", zipfile.Path(archive, "fscnn_tvm/schedules/"))
    finally:
        for path in [sets, *sets.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    assert _snapshot(sets) == before
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 1 and "1 line(s) left out" in left_out[0], left_out  # once for the same lines
    count = sum(1 for line in before[f"vgg16_cifar_s90_avx2/{RECORDS}"].decode().splitlines() if line.strip()) - 1
    assert len(from_dir.get_all_tuning_records()) == len(from_zip.get_all_tuning_records()) == count > 0


def test_the_package_ships_sets_that_say_what_they_were_tuned_on():
    sets = records.shipped_sets()
    assert len(sets) >= 10 and all(s.records > 0 and s.tuned_on.startswith("--model ") for s in sets)
    readme = (records.SHIPPED / "README.md").read_text()
    assert all(s.name in readme or s.name.endswith("_avx2") for s in sets)
    for s in sets:
        meta = json.loads((records.SHIPPED / s.name / records.TARGET_FILE).read_text())
        assert meta["mcpu"] == s.mcpu


def test_compile_warns_once_when_sparse_kernels_have_no_record(small_model, default_log, caplog):
    model, x, imported = small_model

    def warnings(**kw):
        caplog.clear()
        with caplog.at_level("WARNING", logger="fscnn_tvm"):
            fscnn_tvm.compile(imported, **kw)
        return [r.getMessage() for r in caplog.records if UNTUNED in r.getMessage()]

    [message] = warnings()  # the shipped sets hold nothing for this model
    assert message.startswith(f"3 of 3 sparse kernels {UNTUNED} in the schedules shipped for this CPU")
    assert "fscnn_tvm.tune(imported, trials=96, log_dir='tuning_logs/my_model'), then " \
           "fscnn_tvm.compile(imported, tuning_log='tuning_logs/my_model')" in message
    [message] = warnings(tune_command="fscnn-tvm tune --program small.pt2")
    assert message.endswith("Tune them with: fscnn-tvm tune --program small.pt2")
    assert warnings(use_shipped=False) == []  # no record asked for
    assert warnings(tuning_log=default_log) == []  # every kernel has one


def test_a_missing_log_directory_is_named(small_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="tuning_log: .*missing is not a directory"):
        records.resolve_database(str(tmp_path / "missing"), small_model[2].target)



def _conv_spec(seed, sparsity=0.9):
    """A 3x3 conv's weight, sparse kernel spec and arrays for a pattern drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((32, 24, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0
    spec, arrays = ops.kernel_inputs("conv2d", formats.to_csr(w), (1, 24, 14, 14), None, "relu", resolve_target(None),
                                     padding=1)
    return w, spec, arrays


def test_width_classes_are_powers_of_two_and_leave_other_kernels_alone():
    _, spec, _ = _conv_spec(0)
    width, cls = spec.ell_shape[1], records.width_class(spec)
    assert width <= cls.ell_shape[1] < 2 * width and cls.ell_shape[1] & (cls.ell_shape[1] - 1) == 0
    assert cls.ell_shape[0::2] == spec.ell_shape[0::2] and records.width_class(cls) == cls
    dense_spec, _ = dense.dense_inputs(np.ones((8, 4, 3, 3), np.float32), (1, 4, 8, 8), None, None,
                                       resolve_target(None), padding=1)
    assert records.width_class(dense_spec) is dense_spec


def test_a_record_tuned_on_one_pattern_serves_another_pattern_of_the_same_shapes():
    """Sampled schedules (as a tuning job records them) of the kernel for one pattern, the best
    committed under its width class: the kernel of another pattern, another ELL width in that
    class, replays it with its own width and computes the conv."""
    target = resolve_target(None)
    _, spec, _ = _conv_spec(0)
    w, other, arrays = next(s for s in (_conv_spec(seed) for seed in range(1, 60))
                            if s[1].ell_shape[1] != spec.ell_shape[1]
                            and records.width_class(s[1]) == records.width_class(spec))
    db = ms.database.MemoryDatabase()
    mod = records.workload(spec)
    for seed in (1, 2, 3):  # sampled decisions, the nonzero loop's split among them
        sch = schedule.schedule_sparse(mod["main"], spec, SampledDecisions(), seed=seed)
        db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(mod), [1e-3 * seed], target,
                                                         ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    assert records.best_schedule(other, db)[1] is False  # no record of its own, none for its class
    assert records.add_width_classes(db, [spec], target) == 1
    assert records.add_width_classes(db, [spec], target) == 0  # the class holds that record already
    sch, tuned = records.best_schedule(other, db)
    assert tuned
    x = np.random.default_rng(1).standard_normal((1, 24, 14, 14)).astype(np.float32)
    out = tvm.runtime.empty(other.out_shape, "float32")
    _build(sch, target)(tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in arrays], out)
    ref = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1)).numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_a_kernel_that_adds_a_residual_replays_the_record_of_its_twin_without(small_model, default_log):
    import dataclasses
    model, x, imported = small_model
    kernel = next(k for n, k in imported.kernels.items() if "conv" in n)  # model[0]: conv 8->16, ReLU
    spec = dataclasses.replace(kernel.spec, residual=True)
    assert kernels.tuned_as(spec) == kernel.spec
    sch, tuned = records.best_schedule(spec, open_database(default_log))
    assert tuned
    func = _build(sch, imported.target)
    residual = np.random.default_rng(0).standard_normal(spec.out_shape).astype(np.float32)
    out = tvm.runtime.empty(spec.out_shape, "float32")
    func(tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(a) for a in kernel.arrays], tvm.runtime.tensor(residual),
         out)
    conv = model[0]
    ref = torch.relu(conv(x) + torch.from_numpy(residual)).detach().numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
@pytest.mark.parametrize("shipped", records.shipped_sets(), ids=lambda s: s.name)
def test_every_sparse_kernel_of_a_shipped_sets_model_has_a_record(shipped, monkeypatch):
    """No silent staleness: the model a set was tuned on, imported today for the set's CPU (its
    caches as the set names them, whatever this machine's are), finds a shipped record (its own
    or its width class's) for every sparse kernel."""
    from fscnn_tvm import target as target_module
    from fscnn_tvm.cli import build_parser, shipped_coverage
    assert len(shipped.caches) == 3, f"{shipped.name}: target.json names no caches"
    monkeypatch.setattr(target_module, "on_host", lambda target: False)
    monkeypatch.setenv(target_module.CACHES_ENV, ",".join(str(c) for c in shipped.caches))
    args = build_parser().parse_args(["schedules", *shipped.tuned_on.split(), "--no-measure"])
    _, sparse, missing = shipped_coverage(args, tvm.target.Target(json.loads(shipped.target)))
    assert sparse and not missing, f"{len(missing)} of {len(sparse)} sparse kernels have no record: {missing}"


def test_a_sparse_kernel_with_a_pool_replays_its_twins_record_and_places_the_pool():
    """A record of the kernel without the pool replays on the pooled kernel, the pool then moved
    into the record's tasks, or where those tasks' rows do not hold whole windows (1 or 3 rows a
    task) run after the kernel in a parallel loop of its own."""
    from fscnn_tvm import tiles
    target = resolve_target(None)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0
    x = rng.standard_normal((1, 8, 16, 16)).astype(np.float32)
    ref = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), padding=1)), 2).numpy()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "chunking", lambda spec, mean_row: 4)
        spec, arrays = ops.kernel_inputs("conv2d", formats.to_csr(w), x.shape, None, "relu", target, padding=1)
    pooled = tiles.with_pool(spec, 2, 2, 0)
    assert kernels.tuned_as(pooled) == spec
    for rows in (4, 1, 3):  # the record's tile rows (a task's rows; 3: a partial last task)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(schedule, "chunk_tile", lambda s: (rows, tiles.chunk_tile(s)[1]))
            trace = schedule.schedule_sparse(ops.prim_func(spec), spec).trace
        db = ms.database.MemoryDatabase()
        workload = db.commit_workload(tvm.IRModule({"main": kernels.prim_func(spec)}))
        db.commit_tuning_record(ms.database.TuningRecord(trace, workload, [1e-3], target))
        sch, tuned = records.best_schedule(pooled, db)
        assert tuned

        def parallel_loops(s):
            return kernels.lower(s, target).script().count("T.parallel")
        twin = tvm.s_tir.Schedule(kernels.prim_func(spec))
        trace.apply_to_schedule(twin, remove_postproc=False)
        assert parallel_loops(sch) == parallel_loops(twin) + (rows % 2)  # (odd rows: the pool's own loop)
        out = tvm.runtime.empty(pooled.out_shape, "float32")
        _build(sch, target)(*[tvm.runtime.tensor(a) for a in [x, *arrays]], out)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)
