"""runtime: what compile does to operators that no record schedules."""
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
