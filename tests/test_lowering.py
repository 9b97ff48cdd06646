"""The post-schedule rewrite refuses kernels it cannot fully see instead of skipping parts."""
import numpy as np
import pytest
import tvm

import fscnn_tvm
from fscnn_tvm import lowering, ops
from fscnn_tvm.formats import to_csr


def _scheduled(rng):
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0
    spec, _ = ops.kernel_inputs("conv2d", to_csr(w), (1, 4, 8, 8), None, "relu", fscnn_tvm.resolve_target(None),
                                padding=1)
    return ops.schedule_sparse(ops.prim_func(spec), spec).mod["main"]


def test_the_rewrite_permutes_the_one_epilogue_store():
    lowered = lowering.lower_sparse(_scheduled(np.random.default_rng(0))).script()
    assert "w_perm[" in lowered and "w_length[" in lowered


def test_a_statement_kind_it_does_not_know_is_an_error():
    func = _scheduled(np.random.default_rng(1))
    hidden = func.with_body(tvm.tirx.IfThenElse(tvm.tirx.const(True, "bool"), func.body, None))
    with pytest.raises(NotImplementedError, match="IfThenElse"):
        lowering.lower_sparse(hidden)


def test_a_kernel_without_its_epilogue_store_is_an_error():
    func = _scheduled(np.random.default_rng(2))
    with pytest.raises(NotImplementedError, match="one epilogue block"):
        lowering.lower_sparse(func.with_body(tvm.tirx.Evaluate(0)))


def test_functions_without_a_permutation_pass_through():
    func = tvm.tirx.PrimFunc([], tvm.tirx.Evaluate(0))
    assert lowering.lower_sparse(func).same_as(func)
