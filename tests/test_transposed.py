"""The register transpose of an epilogue that stores NCHW rows from channels in the lanes
(``transposed.py``): its shuffle rounds, and the Winograd kernel that runs it, against torch."""
import numpy as np
import pytest
import tvm

from fscnn_tvm import kernels, transposed, winograd
from fscnn_tvm.target import resolve_target
from test_ops import assert_matches, host_avx2, torch_conv
from test_winograd import run_kernel


@pytest.mark.parametrize("width,lanes", [(2, 2), (2, 16), (4, 16), (8, 16), (16, 16), (4, 8), (8, 8), (16, 32)])
def test_shuffle_rounds_transpose_the_registers(width, lanes):
    regs = np.arange(width * lanes).reshape(width, lanes)  # row t: column t's channels
    for rounds in transposed.shuffle_rounds(width, lanes):
        regs = np.stack([np.concatenate([regs[a], regs[b]])[where] for a, b, where in rounds])
    flat = regs.reshape(-1)  # lane r * width + t: channel r, column t
    assert (flat == np.arange(width * lanes).reshape(width, lanes).T.reshape(-1)).all()


@pytest.mark.parametrize("width,lanes", [(3, 16), (32, 16), (1, 16), (4, 12)])
def test_shuffle_rounds_refuse_what_they_cannot_transpose(width, lanes):
    with pytest.raises(ValueError, match="powers of two"):
        transposed.shuffle_rounds(width, lanes)


TARGETS = [None] + ([{"kind": "llvm", "mcpu": "haswell"}] if host_avx2() else [])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("n,c,k,h,w,has_bias,has_residual,activation", [
    (1, 8, 16, 8, 16, True, False, "relu"),  # one vector of channels, a row of 16
    (2, 5, 40, 9, 8, False, True, "relu6"),  # channels past the last whole vector, the batch's rows
    (1, 16, 33, 4, 32, True, True, None),  # two vectors a row
    (1, 3, 20, 6, 24, True, False, None),  # 24 columns: vectors of 8
    (2, 4, 17, 12, 12, True, True, "relu"),  # vectors of 16 pixels that span rows
    (1, 6, 16, 7, 6, False, False, None),  # vectors of 8 that span rows, a last row of tiles cut
])
def test_the_winograd_epilogue_stores_transposed_rows_and_matches(n, c, k, h, w, has_bias, has_residual,
                                                                  activation, target):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32) if has_bias else None
    residual = rng.standard_normal((n, k, h, w)).astype(np.float32) if has_residual else None
    spec = winograd.make_spec(x.shape, weight.shape, has_bias, activation, resolve_target(target), padding=1)
    assert winograd.store_width(winograd.TILE * w, spec.lanes) >= winograd.MIN_STORE_WIDTH
    lowered = kernels.lower(winograd.default_schedule(winograd.prim_func(spec), spec))
    assert "transposed0" in lowered.script()  # (the rewrite ran)
    ref = torch_conv(x, weight, bias, 1, 1, 1, None)
    ref = ref + residual if residual is not None else ref
    ref = np.clip(ref, 0, 6 if activation == "relu6" else None) if activation else ref
    assert_matches(run_kernel(x, weight, bias, activation, residual, target), ref)


@pytest.mark.parametrize("pixels,lanes,expected", [(4 * 224, 16, 16), (4 * 56, 16, 16), (4 * 28, 16, 16),
                                                   (4 * 14, 16, 8), (4 * 7, 16, 1), (4 * 14, 8, 8), (4 * 7, 8, 1)])
def test_rows_of_tiles_that_split_into_narrow_vectors_keep_scalar_stores(pixels, lanes, expected):
    assert winograd.store_width(pixels, lanes) == expected


def test_a_loop_that_is_not_one_blocks_vectorised_stores_is_refused():
    from fscnn_tvm.decisions import TRANSPOSE_ATTR
    i = tvm.tirx.Var("i", "int32")
    buf = tvm.tirx.decl_buffer((4,), "float32", "y")
    loop = tvm.tirx.For(i, 0, 4, tvm.tirx.ForKind.SERIAL, tvm.tirx.BufferStore(buf, tvm.tirx.const(0.0, "float32"), [i]),
                        annotations={TRANSPOSE_ATTR: "y"})
    with pytest.raises(NotImplementedError, match="not a loop over one block"):
        transposed.transposed_loop(loop, "y", {})
