"""geometry: the input layout's rows, and the kernels that read a layout with a padding row
checked against PyTorch."""
import numpy as np
import pytest

import fscnn_tvm
from fscnn_tvm.formats import round_up
from fscnn_tvm.geometry import PAGE_BYTES, ConvGeometry, InputLayout
from test_ops import assert_matches, rng, sparse_weight, torch_conv  # noqa: F401 - rng: fixture


def _layout(x_shape, w_shape, lanes=16, band_rows=None, **conv):
    geo = ConvGeometry.create(x_shape, w_shape, **conv)
    return InputLayout(geo, band_rows, round_up(geo.phase_width, lanes))


@pytest.mark.parametrize("x_shape,w_shape,band_rows,conv,rows", [
    ((1, 128, 112, 112), (128, 128, 3, 3), 14, dict(padding=1), 17),  # 16 rows of 128 floats: 8 KiB
    ((1, 128, 112, 112), (128, 128, 3, 3), 8, dict(padding=1), 10),  # 5 KiB: as it is
    ((1, 8, 30, 30), (8, 8, 3, 3), None, dict(padding=1), 33),  # 32 rows of 32: one page
    ((1, 8, 62, 62), (8, 8, 3, 3), None, dict(padding=1, stride=2), 33),  # 4 phases of 32x32
    ((1, 64, 56, 56), (64, 64, 3, 3), None, dict(padding=1), 58),
])
def test_a_channel_spanning_whole_pages_gets_one_more_row(x_shape, w_shape, band_rows, conv, rows):
    """Channels a whole number of pages apart would start on the same L1d sets."""
    layout = _layout(x_shape, w_shape, band_rows=band_rows, **conv)
    assert layout.rows == rows
    stride = layout.geo.phases * layout.rows * layout.width
    assert stride * 4 % PAGE_BYTES
    assert layout.size == layout.geo.in_channels * stride
    c, r, s = 3, 2, 1  # weight column (channel 3, tap row 2, tap column 1) starts at its channel's plane
    col = np.array([(c * layout.geo.kh + r) * layout.geo.kw + s])
    sh, sw = layout.geo.stride
    plane = (r % sh) * sw + s % sw  # the stride phase the tap reads
    assert int(layout.offsets(col)[0]) == c * stride + (plane * layout.rows + r // sh) * layout.width + s // sw


@pytest.mark.parametrize("x_shape,w_shape,conv", [
    ((1, 8, 30, 30), (12, 8, 3, 3), dict(padding=1)),
    ((2, 8, 62, 62), (12, 8, 3, 3), dict(padding=1, stride=2)),
    ((1, 16, 30, 30), (16, 16, 3, 3), dict(padding=1)),
])
def test_kernels_on_a_padded_layout_match_pytorch(rng, x_shape, w_shape, conv):
    w = sparse_weight(rng, w_shape, 0.8)
    layer = fscnn_tvm.SparseLayer("conv2d", w, x_shape, activation="relu", **conv)
    assert layer.spec.layout.rows == layer.spec.geo.band_height(layer.spec.band_rows) + 1
    x = rng.standard_normal(x_shape).astype(np.float32)
    assert_matches(layer(x), torch_conv(x, w, activation="relu", **conv))
