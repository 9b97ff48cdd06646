"""The sparse convs' input layout pass (``layout_pass``) against torch, through the kernels
that read it."""

import numpy as np
import pytest

from fscnn_tvm import layer
from test_ops import assert_matches, host_avx2, rng, sparse_weight, torch_conv  # noqa: F401 - rng: fixture


@pytest.mark.parametrize("stride,padding,kernel", [
    (2, 1, 3), ((1, 2), (0, 2), 3), (3, 3, 5), ((2, 3), (3, 1, 0, 2), 3), (2, 0, 1)])
def test_column_strides_lay_out_padded_rows_first(rng, stride, padding, kernel):
    """A column stride lays each channel's padded rows out first and picks the column phases
    from them in whole vectors (``InputLayout.rows_first``), whatever the row stride, padding
    (wider than the stride too) and kernel; maps big enough that the spatial kernels chunk their
    reduction."""
    x = rng.standard_normal((2, 48, 59, 61)).astype(np.float32)
    w = sparse_weight(rng, (16, 48, kernel, kernel), 0.9)
    b = rng.standard_normal(16).astype(np.float32)
    lay = layer.SparseLayer("conv2d", w, x.shape, b, stride=stride, padding=padding, activation="relu")
    assert lay.spec.layout.rows_first and (lay.spec.chunk_channels or kernel == 1)
    assert_matches(lay(x), torch_conv(x, w, b, stride=stride, padding=padding, activation="relu"))


@pytest.mark.parametrize("target", [
    {"kind": "llvm"},  # no mcpu: 4 lanes, no vector shuffle of the target's width
    pytest.param("llvm -mcpu=haswell", marks=pytest.mark.skipif(not host_avx2(), reason="needs AVX2"))])
def test_column_strides_on_narrower_vectors(rng, target):
    """The phase picks at a column stride on 4- and 8-lane targets (their shuffles of two
    narrower vectors), a stride-2 kernel chunked or not."""
    for shape, cout in (((1, 48, 57, 57), 24), ((2, 5, 13, 16), 8)):
        x = rng.standard_normal(shape).astype(np.float32)
        w = sparse_weight(rng, (cout, shape[1], 3, 3), 0.8)
        lay = layer.SparseLayer("conv2d", w, x.shape, stride=2, padding=1, activation="relu", target=target)
        assert lay.spec.layout.rows_first
        assert_matches(lay(x), torch_conv(x, w, stride=2, padding=1, activation="relu"))
