"""runtime: what compile does to operators that no record schedules; calls from several threads."""
import threading

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from fscnn_tvm import runtime
from fscnn_tvm.target import resolve_target


@I.ir_module
class ResidualAndPool:
    @R.function
    def main(x: R.Tensor((1, 8, 12, 12), "float32"), y: R.Tensor((1, 8, 12, 12), "float32")):
        with R.dataflow():
            s = R.nn.relu(R.add(x, y))
            p = R.nn.max_pool2d(s, pool_size=[2, 2], strides=[2, 2])
            R.output(p)
        return p


def test_unscheduled_operators_run_parallel_and_stay_correct():
    target = resolve_target(None)
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR()])(ResidualAndPool)
    scheduled = runtime._parallelize_unscheduled(mod)
    funcs = [f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 2  # add + ReLU fused; pooling (a reduction)
    for func in funcs:
        assert "tir.is_scheduled" in func.attrs and "T.parallel" in func.script()
    x, y = (np.random.default_rng(i).standard_normal((1, 8, 12, 12)).astype(np.float32) for i in range(2))
    vm = relax.VirtualMachine(runtime.compile_module(ResidualAndPool, target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()
    ref = np.maximum(x + y, 0).reshape(1, 8, 6, 2, 6, 2).max(axis=(3, 5))
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_one_compiled_model_called_from_many_threads_at_once():
    model = runtime.CompiledModel(runtime.compile_module(ResidualAndPool, resolve_target(None)))
    rng = np.random.default_rng(0)
    inputs = [tuple(rng.standard_normal((1, 8, 12, 12)).astype(np.float32) for _ in range(2)) for _ in range(8)]
    expected = [model(*xy) for xy in inputs]  # one thread
    start, results, errors = threading.Barrier(8), {}, []

    def work(i):
        try:
            start.wait()
            run = model.runner(*inputs[i])
            results[i] = [model(*inputs[i]) for _ in range(10)]
            run()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for i in range(8):
        for out in results[i]:
            np.testing.assert_array_equal(out, expected[i])
