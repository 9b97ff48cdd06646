"""schedule: every point of the sparse kernel's design space computes the layer; the default
schedule's structure (tiles bounded by their longest row, the parallel loop's variant)."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
import tvm
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fscnn_tvm
from fscnn_tvm import layer, ops, schedule, tiles
from fscnn_tvm.decisions import TILE_BOUND, SampledDecisions
from fscnn_tvm.formats import to_csr
from fscnn_tvm.lowering import kernel_func
from test_ops import _uneven_rows, assert_matches, banded, rng, torch_conv, torch_linear  # noqa: F401 - rng: fixture


def _run_sampled(kind, w, x, bias, fmt, block, variant, seed, **conv):
    target = fscnn_tvm.resolve_target(None)
    spec, arrays = ops.kernel_inputs(kind, fscnn_tvm.formats.to_format(w, fmt, block), x.shape, bias, "relu",
                                     target, **conv)
    sch = schedule.schedule_sparse(ops.prim_func(spec), spec, SampledDecisions(), variant, seed)
    out = np.zeros(spec.out_shape, np.float32)
    tensors = [tvm.runtime.tensor(a) for a in [x, *arrays, out]]
    layer._build(sch, target)(*tensors)
    event(f"{kind}: nonzero loop bounded per tile: {'w_length[' in kernel_func(sch).script()}")
    return tensors[-1].numpy()


@settings(max_examples=16, deadline=None)
@given(seed=st.integers(1, 2**30), variant=st.sampled_from(schedule.VARIANTS + schedule.BANDED),
       fmt=st.sampled_from(["csr", "bsr"]))
def test_sampled_schedules_match_pytorch(seed, variant, fmt):
    """Any point the tuner may pick (tiles, unrolling, bounded or padded nonzero loops) computes
    the layer: rows of every length, channels stored through the table's permutation."""
    rng = np.random.default_rng(seed)
    block = (4, 1) if fmt == "bsr" else None
    w, b = _uneven_rows(rng, (22, 6, 3, 3)), rng.standard_normal(22).astype(np.float32)
    x = rng.standard_normal((2, 6, 23, 13)).astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:
        if variant in schedule.BANDED:
            patch.setattr(ops, "band_rows_for", lambda layout, cache, *_: banded(layout.geo, seed))
        out = _run_sampled("conv2d", w, x, b, fmt, block, variant, seed, stride=2, padding=1)
    assert_matches(out, torch_conv(x, w, b, stride=2, padding=1, activation="relu"))
    wl, xl = _uneven_rows(rng, (19, 40)), rng.standard_normal((3, 40)).astype(np.float32)
    out = _run_sampled("linear", wl, xl, b[:19], fmt, block, None, seed)
    assert_matches(out, torch_linear(xl, wl, b[:19], activation="relu"))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(1, 2**30), chunk=st.sampled_from([1, 2, 3, 6]), stride=st.integers(1, 2),
       band=st.booleans(), shared=st.integers(1, 4))
def test_sampled_chunked_schedules_match_pytorch(seed, chunk, stride, band, shared):
    """Any point of the chunked kernel's design space (channels per task, tile rows and vectors,
    unrolling; laid out in one pass or per band; ``shared`` channels per table row, run by mask)
    computes the layer: rows of every length, empty chunks, channels permuted."""
    rng = np.random.default_rng(seed)
    w, b = _uneven_rows(rng, (22, 6, 3, 3)), rng.standard_normal(22).astype(np.float32)
    x = rng.standard_normal((2, 6, 23, 13)).astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "chunking", lambda spec, mean_row: chunk)
        patch.setattr(ops, "shared_channels", lambda spec, sharing: shared)
        if band:
            patch.setattr(ops, "band_rows_for", lambda layout, cache, *_: banded(layout.geo, seed))
        out = _run_sampled("conv2d", w, x, b, "csr", None, "chunks", seed, stride=stride, padding=1)
    assert_matches(out, torch_conv(x, w, b, stride=stride, padding=1, activation="relu"))


@settings(max_examples=16, deadline=None)
@given(seed=st.integers(1, 2**30), variant=st.sampled_from(schedule.VARIANTS[:3] + schedule.BANDED + schedule.CHUNKED),
       shared=st.integers(1, 3))
def test_sampled_interleaved_schedules_match_pytorch(seed, variant, shared):
    """Any point the tuner may pick for a conv on interleaved rows (pixel tiles of any number of
    vectors: the epilogue gathers a row once all of them ran) computes the layer."""
    rng = np.random.default_rng(seed)
    w, b = _uneven_rows(rng, (22, 6, 3, 3)), rng.standard_normal(22).astype(np.float32)
    x = rng.standard_normal((2, 6, 14, 37)).astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiles, "INTERLEAVE_NONZEROS", 0)
        patch.setattr(ops, "shared_channels", lambda spec, sharing: shared)
        patch.setattr(ops, "chunking", lambda spec, mean_row: 3 if variant in schedule.CHUNKED else None)
        if variant in schedule.BANDED or seed % 2 and variant in schedule.CHUNKED:
            patch.setattr(ops, "band_rows_for", lambda layout, cache, *_: banded(layout.geo, seed))
        else:
            patch.setattr(ops, "band_rows_for", lambda *_: None)
        spec, _ = ops.kernel_inputs("conv2d", fscnn_tvm.formats.to_csr(w), x.shape, b, "relu",
                                    fscnn_tvm.resolve_target(None), padding=1)
        assert spec.interleaved and variant in schedule.variants(spec)
        out = _run_sampled("conv2d", w, x, b, "csr", None, variant, seed, padding=1)
    assert_matches(out, torch_conv(x, w, b, padding=1, activation="relu"))


def test_chunked_default_schedule_bounds_each_chunk_exactly(rng):
    target = fscnn_tvm.resolve_target(None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "chunking", lambda spec, mean_row: 2)
        spec, _ = ops.kernel_inputs("conv2d", to_csr(_uneven_rows(rng, (8, 4, 3, 3))), (1, 4, 8, 8), None, None,
                                    target, padding=1)
    assert schedule.variants(spec) == schedule.CHUNKED and spec.chunk_channels == 2
    lowered = kernel_func(schedule.default_schedule(ops.prim_func(spec), spec)).script()
    assert "range(w_span[" in lowered and "w_perm[" in lowered and TILE_BOUND not in lowered


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_a_shared_rows_kernel_runs_one_slot_loop_per_mask_on_a_register_tile(rng, channels):
    """Channels per table row: one slot loop per mask of them (2**channels - 1), each with its
    own channels' updates only and no guard, on tiles (one per channel) copied in before them
    and out after."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "chunking", lambda spec, mean_row: 2)
        patch.setattr(ops, "shared_channels", lambda spec, sharing: channels)
        spec, _ = ops.kernel_inputs("conv2d", to_csr(_uneven_rows(rng, (8, 4, 3, 3))), (1, 4, 8, 8), None, None,
                                    fscnn_tvm.resolve_target(None), padding=1)
    assert spec.ell_shape[2:] == (channels, 1)
    lowered = kernel_func(schedule.default_schedule(ops.prim_func(spec), spec)).script()
    assert lowered.count("for w in range(w_span[") == 2 ** channels - 1
    assert lowered.count('T.sblock("acc_update")') == channels * 2 ** (channels - 1)  # each channel in half the masks
    assert "if_then_else" not in lowered.split('T.sblock("acc_update")', 1)[1].split("acc_tile0[r", 1)[0]
    for i in range(channels):  # each channel's tile in, and out
        assert lowered.count(f"acc_tile{i}[r, v *") == 2


def test_default_schedule_bounds_each_tile_by_its_longest_row(rng):
    target = fscnn_tvm.resolve_target(None)
    spec, _ = ops.kernel_inputs("conv2d", to_csr(_uneven_rows(rng, (8, 4, 3, 3))), (1, 4, 8, 8), None, None,
                                target, padding=1)
    sch = schedule.default_schedule(ops.prim_func(spec), spec)
    assert "w_length[" not in sch.mod["main"].script()
    lowered = kernel_func(sch).script()
    assert "T.max(w_length[" in lowered and "w_perm[" in lowered and TILE_BOUND not in lowered


@pytest.mark.parametrize("cin,size,variant", [(512, 28, "tiles"), (128, 28, "rows+channels"), (64, 56, "rows+channels")])
def test_default_variant_keeps_pixel_tiles_outermost_only_where_the_input_exceeds_l2(rng, cin, size, variant):
    w = rng.standard_normal((64, cin, 1, 1)).astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:  # (the one-pass kernel's variants)
        patch.setattr(ops, "chunking", lambda spec, mean_row: None)
        spec, _ = ops.kernel_inputs("conv2d", to_csr(w), (1, cin, size, size), None, None,
                                    fscnn_tvm.resolve_target("llvm -mcpu=haswell"))
    spec = dataclasses.replace(spec, l2_bytes=512 << 10)
    assert schedule.default_variant(spec) == variant



@settings(max_examples=12, deadline=None)
@given(seed=st.integers(1, 2**30), chunk=st.sampled_from([1, 2, 6]), band=st.booleans(), shared=st.integers(1, 3),
       interleaved=st.booleans())
def test_a_pool_in_the_chunked_kernels_tasks_matches_pytorch(seed, chunk, band, shared, interleaved):
    """VGG's 2x2 max pool after a chunked kernel (``tiles.with_pool``), in the task that writes
    its rows: channels permuted, rows of every length, interleaved rows or not, the pool's columns
    in vectors with a partial last one."""
    rng = np.random.default_rng(seed)
    w, b = _uneven_rows(rng, (22, 6, 3, 3)), rng.standard_normal(22).astype(np.float32)
    x = rng.standard_normal((2, 6, 24, 26)).astype(np.float32)
    target = fscnn_tvm.resolve_target(None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "chunking", lambda spec, mean_row: chunk)
        patch.setattr(ops, "shared_channels", lambda spec, sharing: shared)
        patch.setattr(ops, "interleaves", lambda *a: interleaved)
        patch.setattr(tiles, "chunk_tile", lambda spec: (4, tiles._largest_divisor(spec.padded_width // spec.lanes, 8)))
        patch.setattr(schedule, "chunk_tile", tiles.chunk_tile)
        if band:
            patch.setattr(ops, "band_rows_for", lambda layout, cache, *_: 4)
        spec, arrays = ops.kernel_inputs("conv2d", to_csr(w), x.shape, b, None, target, padding=1)
        spec = tiles.with_pool(spec, 2, 2, 0)
        assert spec is not None and spec.out_shape == (2, 22, 12, 13)
        sch = schedule.schedule_sparse(ops.prim_func(spec), spec)
        out = tvm.runtime.empty(spec.out_shape, "float32")
        layer._build(sch, target)(*[tvm.runtime.tensor(a) for a in [x, *arrays]], out)
    event(f"band: {spec.band_rows}, interleaved: {spec.interleaved}")
    expected = TF.max_pool2d(torch.as_tensor(torch_conv(x, w, b, padding=1)), 2).numpy()
    assert_matches(out.numpy(), expected)
