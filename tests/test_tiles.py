"""tiles: the sparse kernel's policies on a CPU description (vector width, flattening, the
default register tile, band heights, chunk sizes), each checked on known shapes and caches, and
the kernels they pick checked against PyTorch."""
import dataclasses
import mmap

import numpy as np
import pytest
import tvm

import fscnn_tvm
from fscnn_tvm import ops, tiles
from fscnn_tvm.formats import interleave_rows, round_up, to_csr
from fscnn_tvm.geometry import ConvGeometry, InputLayout
from fscnn_tvm.target import Caches
from test_ops import _uneven_rows, assert_matches, host_avx2, rng, sparse_weight, torch_conv  # noqa: F401 - rng: fixture

ZEN4 = Caches(32 << 10, 1 << 20, 64, 2)  # per core: 32 KiB L1d, 1 MiB L2; 64-byte lines; 2 cores
ZEN3 = Caches(32 << 10, 512 << 10, 64, 2)


@pytest.mark.parametrize("hw,flattens", [(7, False), (28, True), (56, False)])
def test_flattening_follows_padding_then_register_tile(hw, flattens):
    """AVX2 (8 lanes, 16 registers): 7x7 pads as much either way, and its per-row tile
    (2 channels x 7 rows x 1 vector) is bigger than the flattened one (7 vectors); so is 56x56's
    (4 x 4 rows x 1); 28x28 pads less flattened."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    spec = ops.make_spec("conv2d", (1, 64, hw, hw), (64, 64, 1, 1), (64, 8, 1, 1), False, None, target)
    assert (spec.flat_hw is not None) == flattens
    rng = np.random.default_rng(hw)
    x, w = rng.standard_normal((1, 8, hw, hw)).astype(np.float32), _uneven_rows(rng, (12, 8, 1, 1))
    assert_matches(fscnn_tvm.sparse_conv2d(x, w, target=target if host_avx2() else None), torch_conv(x, w))


@pytest.mark.parametrize("mcpu,registers", [("znver4", 32), ("znver3", 16)])
@pytest.mark.parametrize("size", [7, 13, 14, 28, 56, 224])
def test_default_tile_divides_the_layer_and_fits_the_registers(rng, mcpu, registers, size):
    """The default register tile is a perfect tiling (no partial tiles) of at most one
    accumulator per register."""
    w = rng.standard_normal((64, 8, 3, 3)).astype(np.float32)
    spec, _ = ops.kernel_inputs("conv2d", to_csr(w), (1, 8, size, size), None, None,
                                fscnn_tvm.resolve_target(f"llvm -mcpu={mcpu}"), padding=1)
    channels, rows, vectors = tiles.default_tile(spec)
    assert spec.ell_shape[0] % channels == 0 and size % rows == 0
    assert (spec.padded_width // spec.lanes) % vectors == 0
    assert channels * rows * vectors <= registers


@pytest.mark.parametrize("x_shape,w_shape,conv,cache,rows", [
    ((1, 64, 224, 224), (64, 64, 3, 3), dict(padding=1), ZEN4, 4),  # 4 + 2 halo rows of 240: 360 KiB (7: 540)
    ((1, 128, 112, 112), (128, 128, 3, 3), dict(padding=1), ZEN4, 4),
    ((1, 256, 56, 56), (64, 256, 1, 1), {}, ZEN4, 8),  # no halo
    ((1, 256, 56, 56), (512, 256, 1, 1), dict(stride=2), ZEN4, 4),  # 4 phases per row
    ((1, 512, 28, 28), (512, 512, 3, 3), dict(padding=1), ZEN4, None),  # 1.9 MiB: fits two L2s
    ((1, 512, 28, 28), (512, 512, 3, 3), dict(padding=1), ZEN3, 2),  # ... but not two of half the size
    ((1, 64, 224, 224), (64, 64, 3, 3), dict(padding=1), ZEN3, 2),
    ((1, 64, 56, 56), (64, 64, 3, 3), dict(padding=1), ZEN3, None),
])
def test_band_rows_for_large_inputs_only(x_shape, w_shape, conv, cache, rows):
    geo = ConvGeometry.create(x_shape, w_shape, **conv)
    lanes = 16 if cache is ZEN4 else 8
    layout = InputLayout(geo, None, round_up(geo.phase_width, lanes))
    assert tiles.band_rows_for(layout, cache) == rows
    if rows:
        row_bytes = geo.in_channels * geo.phases * layout.width * 4
        assert geo.out_height % rows == 0 and geo.out_height // rows >= 4
        assert geo.band_height(rows) * row_bytes <= cache.l2 // 2 < geo.band_height(rows + 1) * row_bytes \
            or geo.out_height % (rows + 1)


@pytest.mark.parametrize("images,rows", [(1, None), (2, 7), (8, 7)])
def test_band_rows_for_a_batch_whose_images_exceed_each_cores_l2(images, rows):
    """ResNet-18's stride-2 64->128 at 56x56 (928 KiB an image): one image fits the two L2s;
    at batch 2 each core reads an image of its own, more than half its L2."""
    geo = ConvGeometry.create((images, 64, 56, 56), (128, 64, 3, 3), stride=2, padding=1)
    layout = InputLayout(geo, None, round_up(geo.phase_width, 16))
    assert tiles.band_rows_for(layout, ZEN4, images) == rows


def test_an_unchunked_conv_of_a_batch_lays_out_bands_and_matches(rng):
    """The batch rule above, through ``kernel_inputs`` (a kernel that does not chunk), run."""
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * (rng.random((16, 8, 3, 3)) < 0.1)
    x = rng.standard_normal((2, 8, 56, 56)).astype(np.float32)
    small = Caches(32 << 10, 64 << 10, 64, 2)  # (an L2 the 56x56 input of 8 channels exceeds)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "caches", lambda target: small)
        layer = fscnn_tvm.layer.SparseLayer("conv2d", to_csr(w), x.shape, stride=2, padding=1)
    assert layer.spec.band_rows and not layer.spec.chunk_channels
    assert_matches(layer(x), torch_conv(x, w, stride=2, padding=1))


@pytest.mark.parametrize("x_shape,w_shape,conv,sparsity,chunks", [
    ((1, 64, 56, 56), (64, 64, 3, 3), dict(padding=1), 0.9, True),  # 850 KiB of input
    ((1, 256, 14, 14), (256, 256, 3, 3), dict(padding=1), 0.7, True),
    ((1, 256, 28, 28), (256, 256, 3, 3), dict(padding=1, stride=2), 0.9, True),  # 4 phases
    ((1, 512, 7, 7), (512, 512, 1, 1), {}, 0.9, False),  # 115 KiB: a quarter of the L2 or less
    ((1, 64, 56, 56), (256, 64, 1, 1), {}, 0.9, False),  # ~6 nonzeros a row: 2 chunks would hold 3
    ((1, 512, 28, 28), (512, 512, 3, 3), dict(padding=1), 0.9, True),  # banded: a chunk of the band's window
])
def test_chunking_where_the_input_exceeds_a_quarter_of_the_l2(rng, x_shape, w_shape, conv, sparsity, chunks):
    """The policy on ZEN3's caches: chunks whose input window for the tile's rows fits the L1d,
    with enough nonzeros per row in each; and the kernel computes the layer."""
    target = fscnn_tvm.resolve_target("llvm -mcpu=znver3 -num-cores=2")
    w = sparse_weight(rng, w_shape, sparsity)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "caches", lambda t: ZEN3)
        layer = fscnn_tvm.SparseLayer("conv2d", w, x_shape, activation="relu", target=target, **conv)
    spec = layer.spec
    assert bool(spec.chunk_channels) == chunks
    if chunks:
        geo, rows = spec.geo, spec.band_rows or tiles.chunk_tile(spec)[0]
        assert spec.l1_bytes == ZEN3.l1d and geo.in_channels % spec.chunk_channels == 0
        assert spec.chunk_channels * geo.phases * geo.band_height(rows) * spec.layout.width * 4 <= ZEN3.l1d
        span = layer.arrays[4]  # [chunk, row]: the row's slots on the chunk, [first, end)
        assert span.shape == (geo.in_channels // spec.chunk_channels, spec.ell_shape[0], 2)
        assert spec.chunk_width >= np.diff(span, axis=2).max()
    x = rng.standard_normal(x_shape).astype(np.float32)
    assert_matches(layer(x), torch_conv(x, w, activation="relu", **conv))


@pytest.mark.parametrize("mcpu,w_shape,hw,sparsity,channels", [
    ("znver4", (64, 256, 3, 3), 14, 0.7, 3),  # 3x3: 1.37 FMAs a window load, 2 of 3 windows split lines
    ("znver4", (64, 64, 3, 3), 56, 0.7, 1),  # interleaved rows (aligned windows): one channel
    ("znver4", (64, 256, 1, 1), 56, 0.7, 2),  # pointwise (aligned windows): 2 channels
    ("znver4", (64, 256, 1, 1), 56, 0.9, 2),  # pointwise at 90 %: 2 (one channel per row would not chunk)
    ("znver4", (64, 256, 3, 3), 14, 0.9, 1),  # 1.11 FMAs a load: not worth a loop per mask
    ("znver3", (64, 256, 3, 3), 14, 0.7, 1),  # 16 vector registers: no room for a tile of several channels
])
def test_chunked_csr_convs_share_rows_where_their_channels_share_columns(rng, mcpu, w_shape, hw, sparsity, channels):
    target = fscnn_tvm.resolve_target(f"llvm -mcpu={mcpu} -num-cores=2")
    w = sparse_weight(rng, w_shape, sparsity)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "caches", lambda t: ZEN3)
        spec, arrays = ops.kernel_inputs("conv2d", to_csr(w), (1, w_shape[1], hw, hw), None, None, target,
                                         padding=w_shape[2] // 2)
    assert spec.chunk_channels and spec.ell_shape[2:] == (channels, 1)
    assert arrays[4].shape[2] == 1 << channels  # where each mask's slots begin, then the end


@pytest.mark.parametrize("width,native,lanes", [
    (28, 8, 8), (12, 8, 8), (7, 8, 8), (224, 8, 8),  # AVX2: 4-lane ops cost what 8-lane ones do
    (56, 16, 8), (28, 16, 16), (24, 16, 8), (14, 16, 16), (224, 16, 16),  # AVX-512: half width where it pads less
    (6, 4, 4), (3, 4, 4),  # 128-bit SIMD: nothing narrower
])
def test_choose_lanes(width, native, lanes):
    assert tiles.choose_lanes(width, native) == lanes


@pytest.mark.parametrize("mcpu,w_shape,hw,nonzeros,interleaved", [
    ("znver4", (128, 64, 3, 3), 112, 128 * 58, True),    # widening: 116 reads an input channel, 58 a row
    ("znver3", (128, 64, 3, 3), 112, 128 * 58, False),   # the same with vectors of half a line
    ("znver4", (64, 64, 3, 3), 112, 64 * 58, False),     # square at 58: neither rule
    ("znver4", (128, 128, 3, 3), 28, 128 * 116, False),  # 116 reads, but rows of 2 vectors would double
    ("znver4", (64, 128, 3, 3), 28, 64 * 160, True),     # 160 nonzeros a row: the per-channel rule alone
    ("znver3", (64, 128, 3, 3), 28, 64 * 160, True),
])
def test_interleaved_rows_where_the_reads_pay_for_the_layout(mcpu, w_shape, hw, nonzeros, interleaved):
    """A CSR conv reads interleaved rows from ``INTERLEAVE_NONZEROS`` a row, or from
    ``INTERLEAVE_READS`` an input channel where a vector is a cache line and that layout widens a
    row by at most half."""
    target = fscnn_tvm.resolve_target(f"llvm -mcpu={mcpu}")
    spec = ops.make_spec("conv2d", (1, w_shape[1], hw, hw), w_shape, (w_shape[0], 8, 1, 1), False, None, target,
                         padding=1, nonzeros=nonzeros)
    assert spec.interleaved == interleaved


def test_a_widening_conv_read_interleaved_computes_the_conv(rng):
    """The kernel the reads rule picks (few nonzeros a row, many an input channel) matches PyTorch."""
    w = sparse_weight(rng, (96, 4, 3, 3), 0.0)  # 36 nonzeros a row, 864 an input channel
    x = rng.standard_normal((1, 4, 9, 72)).astype(np.float32)  # rows of 9-10 vectors of 8 or 16 lanes
    spec, _ = ops.kernel_inputs("conv2d", to_csr(w), x.shape, None, None, fscnn_tvm.resolve_target(None), padding=1)
    assert spec.interleaved == (spec.line_vectors == 1)  # (AVX2: plain rows)
    assert_matches(fscnn_tvm.sparse_conv2d(x, w, padding=1), torch_conv(x, w, padding=1))


@pytest.mark.parametrize("mcpu,registers", [("znver4", 32), ("znver3", 16)])
@pytest.mark.parametrize("out_features,fmt,block,batch", [
    (4096, "csr", None, 1), (10, "csr", None, 1), (7, "csr", None, 2), (256, "bsr", (8, 1), 1),
    (256, "bsr", (16, 1), 1), (64, "csr", None, 8)])
def test_a_linear_tile_runs_several_rows_chains_of_fmas(rng, mcpu, registers, out_features, fmt, block, batch):
    """A linear layer's tile holds up to FMA_CHAINS table rows (each a chain of dependent
    adds), dividing the rows and within the registers; images in the lanes keep one row."""
    from fscnn_tvm.formats import to_format
    w = sparse_weight(rng, (out_features, 32), 0.5)
    spec, _ = ops.kernel_inputs("linear", to_format(w, fmt, block), (batch, 32), None, None,
                                fscnn_tvm.resolve_target(f"llvm -mcpu={mcpu}"))
    channels, rows, vectors = tiles.default_tile(spec)
    n_kb, _, bo, _ = spec.ell_shape
    if spec.batch_in_lanes:
        assert (channels, rows, vectors) == (1, 1, 1)
        return
    per_row = -(-bo // spec.lanes)  # vectors a table row's accumulator takes
    assert n_kb % channels == 0 and channels <= tiles.FMA_CHAINS and channels * per_row <= registers - 4
    assert channels == max(c for c in range(1, tiles.FMA_CHAINS + 1)
                           if n_kb % c == 0 and c * per_row <= registers - 4)


@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", (4, 1))])
def test_a_linear_tile_of_rows_from_empty_to_dense_matches(rng, fmt, block):
    """Each tile's nonzero loop runs to its longest row: rows from empty to dense, 8 to a tile."""
    from test_ops import torch_linear
    w = _uneven_rows(rng, (96, 300))
    x = rng.standard_normal((1, 300)).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)
    layer_ = fscnn_tvm.SparseLayer("linear", w, x.shape, b, fmt=fmt, block=block, activation="relu")
    assert tiles.default_tile(layer_.spec)[0] > 1
    assert_matches(layer_(x), torch_linear(x, w, b, "relu"))



@pytest.mark.parametrize("ell_shape,group", [
    ((4096, 420, 1, 1), 8), ((1000, 210, 1, 1), 8), ((998, 300, 1, 1), 2), ((997, 300, 1, 1), 1),
    ((4096, 2520, 1, 1), 1),  # a row of values spanning more than a page (4 KiB) streams as it is
    ((512, 100, 8, 1), 1)])   # BSR: a tile of blocks keeps its rows
def test_linear_group_interleaves_short_csr_rows_by_the_tile(ell_shape, group):
    assert tiles.linear_group(ell_shape) == (group if mmap.PAGESIZE >= 4096 else 1)


def test_interleave_rows_stores_each_group_slot_by_slot():
    table = np.arange(4 * 3).reshape(4, 3)  # rows [0 1 2] [3 4 5] [6 7 8] [9 10 11]
    np.testing.assert_array_equal(interleave_rows(table, 2), [[0, 3, 1], [4, 2, 5], [6, 9, 7], [10, 8, 11]])
    with pytest.raises(ValueError, match="does not divide"):
        interleave_rows(table, 3)


@pytest.mark.parametrize("out_features,in_features,batch,interleaved", [
    (1000, 900, 1, True), (998, 300, 1, True), (997, 300, 1, False), (64, 300, 2, False),  # (images in lanes)
    (64, 2048, 1, False)])  # (a dense row: 8 KiB)
def test_a_linear_table_stored_interleaved_computes_the_linear(rng, out_features, in_features, batch, interleaved):
    """The kernel gets each group of linear_group table rows slot by slot (images in the lanes: the
    table as it is), and reading it so matches PyTorch."""
    from test_ops import torch_linear
    w = _uneven_rows(rng, (out_features, in_features))
    x = rng.standard_normal((batch, in_features)).astype(np.float32)
    layer_ = fscnn_tvm.SparseLayer("linear", w, x.shape)
    group = 1 if layer_.spec.batch_in_lanes else tiles.linear_group(layer_.spec.ell_shape)
    assert (group > 1) == (interleaved and mmap.PAGESIZE >= 4096)
    ell = layer_.sparse.ell(ops.ELL_WIDTH_MULTIPLE)
    np.testing.assert_array_equal(layer_.arrays[0], interleave_rows(ell.data, group))
    assert_matches(layer_(x), torch_linear(x, w))


def test_with_pool_takes_vgg_pools_after_chunked_kernels_whose_tasks_write_whole_windows():
    target = fscnn_tvm.resolve_target(None)
    rng = np.random.default_rng(3)

    def spec(c, size, **patches):
        w = sparse_weight(rng, (c, c, 3, 3), 0.9)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in patches.items():
                patch.setattr(ops, name, value)
            return ops.kernel_inputs("conv2d", to_csr(w), (1, c, size, size), None, "relu", target, padding=1)[0]
    chunked = spec(64, 56, chunking=lambda s, m: 8)
    assert chunked.chunk_channels and tiles.with_pool(chunked, 2, 2, 0).out_shape == (1, 64, 28, 28)
    assert tiles.with_pool(chunked, 3, 2, 1) is None and tiles.with_pool(chunked, 2, 1, 0) is None  # overlapping
    assert tiles.with_pool(spec(64, 56, chunking=lambda s, m: None), 2, 2, 0) is None  # unchunked
    assert tiles.with_pool(dataclasses.replace(chunked, residual=True), 2, 2, 0) is None
    odd = spec(64, 21, chunking=lambda s, m: 8)  # 21 rows: no tile or band of even rows
    assert odd.chunk_channels and tiles.with_pool(odd, 2, 2, 0) is None


@pytest.mark.parametrize("mcpu,c,hw,band,tile", [
    ("znver4", 128, 28, None, (7, 2)),  # a quarter of the map's rows, not the registers' 14
    ("znver4", 512, 14, None, (14, 1)),  # 7 rows of one vector: too few accumulators
    ("znver4", 64, 56, None, (4, 7)),  # 8-lane rows of 7 vectors: the registers bind first
    ("znver4", 512, 28, 2, (2, 2)),  # a banded layout: the band is a task's rows already
    ("znver3", 256, 14, None, (7, 2)),  # 16 registers: 2 rows of 2 vectors would be too few
])
def test_a_chunked_tile_spans_a_quarter_of_the_rows_where_enough_accumulators_remain(mcpu, c, hw, band, tile):
    target = fscnn_tvm.resolve_target(f"llvm -mcpu={mcpu} -num-cores=2")
    w = sparse_weight(np.random.default_rng(5), (c, c, 3, 3), 0.9)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "caches", lambda t: ZEN4)
        patch.setattr(ops, "band_rows_for", lambda *a, **k: band)
        patch.setattr(ops, "chunking", lambda s, m: 8)
        patch.setattr(ops, "half_width_cost", lambda t: 1.0)  # a Zen 4's, whichever CPU runs the test
        spec = ops.kernel_inputs("conv2d", to_csr(w), (1, c, hw, hw), None, "relu", target, padding=1)[0]
    assert spec.band_rows == band and tiles.chunk_tile(spec) == tile
