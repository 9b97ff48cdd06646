"""vmbuild: a model's TIR functions compiled as one module per thread, linked through imports."""
import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from fscnn_tvm import runtime, vmbuild
from fscnn_tvm.target import resolve_target


@I.ir_module
class FourOps:
    @R.function
    def main(x: R.Tensor((2, 8, 12, 12), "float32"), y: R.Tensor((2, 8, 12, 12), "float32")):
        with R.dataflow():
            a = R.nn.relu(R.add(x, y))
            b = R.nn.max_pool2d(a, pool_size=[2, 2], strides=[2, 2])
            c = R.multiply(b, R.const(3.0, "float32"))
            d = R.nn.avg_pool2d(c, pool_size=[3, 3], strides=[1, 1], padding=[1, 1, 1, 1])
            e = R.subtract(d, R.mean(d, axis=[2, 3], keepdims=True))
            R.output(e)
        return e


def _reference(x, y):
    b = torch.nn.functional.max_pool2d(torch.relu(torch.from_numpy(x + y)), 2) * 3
    d = torch.nn.functional.avg_pool2d(b, 3, 1, 1, count_include_pad=False)  # (Relax's default)
    return (d - d.mean(dim=(2, 3), keepdim=True)).numpy()


def test_parts_deal_every_function_once_and_no_empty_part():
    mod = relax.transform.LegalizeOps()(FourOps)
    tir = tvm.IRModule({gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)})
    names = sorted(gv.name_hint for gv in tir.functions)
    for count in (1, 2, 3, len(names), len(names) + 4):
        parts = vmbuild.parts(tir, count)
        assert len(parts) == min(count, len(names)) and all(len(p.functions) for p in parts)
        assert sorted(gv.name_hint for p in parts for gv in p.functions) == names


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_module_built_on_several_threads_runs_and_exports_like_one(threads, tmp_path):
    target = resolve_target(None)
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal((2, 8, 12, 12)).astype(np.float32) for _ in range(2))
    with target, tvm.transform.PassContext(opt_level=3):
        mod = relax.get_pipeline("default")(FourOps)
        exe = vmbuild.build(mod, target, threads=threads)
    model = runtime.CompiledModel(exe, [x.shape, y.shape])
    np.testing.assert_allclose(model(x, y), _reference(x, y), rtol=1e-5, atol=1e-5)
    lib = str(tmp_path / "four.so")
    model.export_library(lib)
    np.testing.assert_allclose(runtime.load(lib)(x, y), _reference(x, y), rtol=1e-5, atol=1e-5)


def test_the_build_threads_see_the_callers_pass_context(monkeypatch):
    """PassContext and Target are per thread: the workers must build under the caller's
    (a disabled pass stays disabled in every part)."""
    seen = []
    real = tvm.tirx.build

    def spy(part, target=None, **kw):
        ctx = tvm.transform.PassContext.current()
        seen.append((ctx.opt_level, "tirx.noalias" in ctx.config, str(tvm.target.Target.current())))
        return real(part, target=target, **kw)

    monkeypatch.setattr(tvm.tirx, "build", spy)
    target = resolve_target(None)
    with target, tvm.transform.PassContext(opt_level=3, config={"tirx.noalias": True}):
        mod = relax.get_pipeline("default")(FourOps)
        vmbuild.build(mod, target, threads=2)
    assert len(seen) == 2 and all(s == (3, True, str(target)) for s in seen)
