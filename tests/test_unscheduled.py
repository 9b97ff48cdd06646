"""unscheduled: the schedules of operators no record schedules (elementwise ops, pooling) keep
their results and run parallel; pooling rows run vectorised."""
import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import fscnn_tvm
from fscnn_tvm import runtime, unscheduled
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


def _legalized(mod):
    return tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                     relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)


def test_unscheduled_operators_run_parallel_and_stay_correct():
    target = resolve_target(None)
    scheduled = unscheduled.parallelize(_legalized(ResidualAndPool), target)
    funcs = {gv.name_hint: f for gv, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert len(funcs) == 2  # add + ReLU fused; pooling (a reduction)
    for func in funcs.values():
        assert "tir.is_scheduled" in func.attrs and "T.parallel" in func.script()
    x, y = (np.random.default_rng(i).standard_normal((1, 8, 12, 12)).astype(np.float32) for i in range(2))
    vm = relax.VirtualMachine(runtime.compile_module(ResidualAndPool, target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()
    ref = np.maximum(x + y, 0).reshape(1, 8, 6, 2, 6, 2).max(axis=(3, 5))
    np.testing.assert_allclose(out, ref, rtol=1e-6)


class _Pool(torch.nn.Module):
    def __init__(self, kind, **args):
        super().__init__()
        self.pool = getattr(torch.nn.functional, kind)
        self.args = args

    def forward(self, x):
        return torch.relu(self.pool(x, **self.args) - 0.1)  # an elementwise consumer after the window


POOLS = [  # (kind, args, input shape, whether a row of outputs runs vectorised)
    ("max_pool2d", dict(kernel_size=3, stride=2, padding=1), (1, 5, 16, 16), True),  # ResNet's stem pool
    ("max_pool2d", dict(kernel_size=3, stride=2, padding=1), (2, 3, 112, 112), True),
    ("max_pool2d", dict(kernel_size=2, stride=2), (1, 4, 32, 32), True),
    ("max_pool2d", dict(kernel_size=2, stride=2), (1, 4, 14, 14), False),  # 7-wide rows
    ("max_pool2d", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), (1, 3, 17, 17), False),
    ("max_pool2d", dict(kernel_size=3, stride=1, padding=1, dilation=2), (1, 3, 10, 12), False),
    ("max_pool2d", dict(kernel_size=(1, 3), stride=(1, 1), padding=(0, 1)), (1, 2, 5, 8), True),
    ("avg_pool2d", dict(kernel_size=3, stride=1, padding=1), (1, 6, 16, 16), True),
    ("avg_pool2d", dict(kernel_size=3, stride=1, padding=1, count_include_pad=False), (2, 3, 8, 8), True),
    ("avg_pool2d", dict(kernel_size=2, stride=2, ceil_mode=True), (1, 3, 15, 15), True),
    ("adaptive_avg_pool2d", dict(output_size=1), (1, 8, 7, 7), False),
]


@pytest.mark.parametrize("kind, args, shape, vectorised", POOLS)
def test_pooling_matches_pytorch(kind, args, shape, vectorised):
    model = _Pool(kind, **args).eval()
    x = torch.from_numpy(np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32))
    imported = fscnn_tvm.import_torch(model, (x,))
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x.numpy()), ref, rtol=1e-5, atol=1e-6)
    with imported.target, tvm.transform.PassContext(opt_level=3):
        scheduled = unscheduled.parallelize(_legalized(imported.mod), imported.target)
    scripts = [f.script() for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any("T.vectorized" in s for s in scripts) == vectorised
    assert all("T.parallel" in s for s in scripts if "T.grid" in s or "range(" in s)


@I.ir_module
class Subsample:  # as a subsampling 1x1 conv's input reaches it: a flat kernel output, sliced, flat again
    @R.function
    def main(x: R.Tensor((1, 8, 1, 144), "float32")):
        with R.dataflow():
            y = R.reshape(x, (1, 8, 12, 12))
            y = R.strided_slice(y, axes=[2, 3], begin=[0, 0], end=[12, 12], strides=[2, 2])
            y = R.reshape(y, (1, 8, 1, 36))
            R.output(y)
        return y


def test_a_reshape_after_a_strided_slice_runs_in_the_slices_loops():
    """The fused reshape/slice/reshape runs over the slice's rows and columns (a column loop of
    6), not over the flattened output's 36 pixels with a div and mod each."""
    target = resolve_target(None)
    scheduled = unscheduled.parallelize(_legalized(Subsample), target)
    (func,) = [f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert "T.parallel" in func.script() and "range(T.int64(6))" in func.script()
    x = np.random.default_rng(0).standard_normal((1, 8, 1, 144)).astype(np.float32)
    vm = relax.VirtualMachine(runtime.compile_module(Subsample, target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(out.reshape(1, 8, 6, 6), x.reshape(1, 8, 12, 12)[:, :, ::2, ::2])
