"""Tests of fscnn_tvm.formats: CSR / BSR round trips, statistics, the blocked-ELL table, and
input validation."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscnn_tvm import formats as F
from fscnn_tvm.formats import BSR, CSR, to_bsr, to_csr, to_format


def random_weight(shape, sparsity=0.6, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0.0
    return w


def dense_from_ell(sparse):
    """Rebuild the (rows, cols) matrix from the ELL table alone: sum data into cols per row."""
    ell = sparse.ell()
    n_kb, width, bo, bi = ell.data.shape
    assert ell.cols.shape == (n_kb, width, bi)
    assert ell.data.dtype == np.float32 and ell.cols.dtype == np.int32
    assert ell.rows == sparse.rows
    assert n_kb * bo >= sparse.rows
    assert ell.cols.min() >= 0 and ell.cols.max() < sparse.cols
    out = np.zeros((n_kb * bo, sparse.cols), np.float64)
    kb, w, io, ii = np.meshgrid(np.arange(n_kb), np.arange(width), np.arange(bo), np.arange(bi), indexing="ij")
    np.add.at(out, (kb * bo + io, ell.cols[kb, w, ii]), ell.data[kb, w, io, ii])
    # Rows past the matrix (block padding) must not receive anything.
    assert not out[sparse.rows:].any()
    # Slots past a row's length are padding: a kernel that stops at the length loses nothing.
    for row, length in enumerate(ell.lengths):
        assert not ell.data[row, length:].any()
    assert sorted(ell.order) == list(range(n_kb))
    assert sorted(ell.perm) == list(range(sparse.rows))
    dense = np.zeros((sparse.rows, sparse.cols), np.float32)
    dense[ell.perm] = out[:sparse.rows]
    return dense


CONV = (6, 3, 3, 3)
LINEAR = (7, 10)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("shape", [CONV, LINEAR, (5, 2, 1, 3), (1, 1), (1, 1, 1, 1), (3, 17)])
@pytest.mark.parametrize("torch_input", [False, True])
def test_csr_round_trip(shape, torch_input):
    w = random_weight(shape, seed=1)
    src = torch.from_numpy(w.copy()) if torch_input else w
    sp = to_csr(src)
    assert isinstance(sp, CSR)
    assert sp.shape == shape
    back = sp.to_dense()
    assert back.shape == shape and back.dtype == np.float32
    np.testing.assert_array_equal(back, w)


@pytest.mark.parametrize("shape", [CONV, LINEAR, (5, 2, 1, 3), (1, 1), (13, 4, 2, 2)])
@pytest.mark.parametrize("block", [(1, 1), (3, 2), (4, 1), (2, 4), (7, 10), (8, 16), [2, 3]])
@pytest.mark.parametrize("torch_input", [False, True])
def test_bsr_round_trip(shape, block, torch_input):
    w = random_weight(shape, seed=2)
    src = torch.from_numpy(w.copy()) if torch_input else w
    sp = to_bsr(src, block)
    assert isinstance(sp, BSR)
    assert sp.block == tuple(block)
    assert sp.shape == shape
    back = sp.to_dense()
    assert back.shape == shape and back.dtype == np.float32
    np.testing.assert_array_equal(back, w)


def test_bsr_non_dividing_block_on_7x10():
    # 3 does not divide the 7 rows; 4 and 3 do not divide the 10 columns.
    w = random_weight((7, 10), sparsity=0.3, seed=3)
    for block in [(3, 2), (3, 4), (2, 3)]:
        sp = to_bsr(w, block)
        bo, bi = block
        assert len(sp.indptr) == -(-7 // bo) + 1
        assert sp.data.shape[1:] == block
        np.testing.assert_array_equal(sp.to_dense(), w)
        np.testing.assert_array_equal(dense_from_ell(sp), w)


def test_torch_requires_grad_and_float64_tensor():
    w = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        w[0] = 0
    expected = w.detach().numpy().astype(np.float32)
    np.testing.assert_array_equal(to_csr(w).to_dense(), expected)
    np.testing.assert_array_equal(to_bsr(w, (3, 2)).to_dense(), expected)


def test_csr_arrays_on_known_example():
    w = np.array([[0, 1, 0], [2, 0, 3]], np.float32)
    sp = to_csr(w)
    np.testing.assert_array_equal(sp.data, [1, 2, 3])
    np.testing.assert_array_equal(sp.indices, [1, 0, 2])
    np.testing.assert_array_equal(sp.indptr, [0, 1, 3])
    assert sp.indices.dtype == np.int32 and sp.indptr.dtype == np.int32


def test_bsr_arrays_on_known_example():
    w = np.array([[0, 1, 0], [2, 0, 3]], np.float32)
    sp = to_bsr(w, (2, 2))
    np.testing.assert_array_equal(sp.indptr, [0, 2])
    np.testing.assert_array_equal(sp.indices, [0, 1])
    np.testing.assert_array_equal(sp.data, [[[0, 1], [2, 0]], [[0, 0], [3, 0]]])
    # A zero block is not stored.
    w2 = np.zeros((4, 4), np.float32)
    w2[3, 3] = 5
    sp2 = to_bsr(w2, (2, 2))
    np.testing.assert_array_equal(sp2.indptr, [0, 0, 1])
    np.testing.assert_array_equal(sp2.indices, [1])
    assert sp2.nnz_blocks == 1


def test_conv_column_order_is_c_kh_kw():
    w = np.zeros((2, 3, 2, 4), np.float32)
    w[1, 2, 1, 3] = 7.0
    sp = to_csr(w)
    assert sp.rows == 2 and sp.cols == 3 * 2 * 4
    np.testing.assert_array_equal(sp.indptr, [0, 0, 1])
    np.testing.assert_array_equal(sp.indices, [(2 * 2 + 1) * 4 + 3])


@settings(max_examples=200, deadline=None, database=None)
@given(
    conv=st.booleans(),
    o=st.integers(1, 19), i=st.integers(1, 13), kh=st.integers(1, 5), kw=st.integers(1, 5),
    sparsity=st.sampled_from([0.0, 0.3, 0.7, 0.95, 1.0]) | st.floats(0.0, 1.0),
    block=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(conv, o, i, kh, kw, sparsity, block, seed):
    shape = (o, i, kh, kw) if conv else (o, i * kh)
    w = random_weight(shape, sparsity, seed)
    count = int(np.count_nonzero(w))
    for sp in (to_csr(w), to_bsr(w, block), to_format(w, "bsr", block), to_format(w, "csr")):
        np.testing.assert_array_equal(sp.to_dense(), w)
        assert sp.nnz == count
        assert sp.sparsity == pytest.approx(1.0 - count / w.size)
        assert sp.dense_nbytes == 4 * w.size
        np.testing.assert_array_equal(dense_from_ell(sp), w.reshape(o, -1))


# ----------------------------------------------------------------------------- statistics

def test_statistics_known_example():
    w = np.array([[0, 1, 0], [2, 0, 3]], np.float32)
    csr = to_csr(w)
    assert (csr.rows, csr.cols, csr.size) == (2, 3, 6)
    assert csr.nnz == 3
    assert csr.sparsity == pytest.approx(0.5)
    assert csr.nbytes == 3 * 4 + 3 * 4 + 3 * 4  # data + indices + indptr
    assert csr.dense_nbytes == 24

    bsr = to_bsr(w, (2, 2))
    assert bsr.nnz == 3  # values, not the zeros stored inside blocks
    assert bsr.nnz_blocks == 2
    assert bsr.sparsity == pytest.approx(0.5)
    assert bsr.nbytes == 2 * 2 * 2 * 4 + 2 * 4 + 2 * 4
    assert bsr.dense_nbytes == 24
    assert "nnz=3" in repr(csr) and "CSR" in repr(csr)
    assert "BSR" in repr(bsr)


def test_statistics_conv_example():
    w = np.zeros((4, 2, 3, 3), np.float32)
    w[0, 0, 0, 0] = 1
    w[3, 1, 2, 2] = -2
    w[3, 0, 1, 1] = 0.5
    sp = to_csr(w)
    assert (sp.rows, sp.cols, sp.size) == (4, 18, 72)
    assert sp.nnz == 3
    assert sp.sparsity == pytest.approx(1 - 3 / 72)
    assert sp.nbytes == 3 * 4 + 3 * 4 + 5 * 4
    assert sp.dense_nbytes == 72 * 4


@pytest.mark.parametrize("shape", [CONV, LINEAR])
def test_all_zero_weight(shape):
    w = np.zeros(shape, np.float32)
    for sp in (to_csr(w), to_bsr(w, (3, 2)), to_bsr(w, (1, 1))):
        assert sp.nnz == 0
        assert sp.sparsity == 1.0
        np.testing.assert_array_equal(sp.to_dense(), w)
        ell = sp.ell()
        assert ell.data.shape[1] == 1  # one (zero) slot per row so the kernel has a loop
        assert not ell.data.any()
        np.testing.assert_array_equal(dense_from_ell(sp), w.reshape(shape[0], -1))
    assert to_bsr(w, (3, 2)).nnz_blocks == 0
    assert to_csr(w).nbytes == (shape[0] + 1) * 4


@pytest.mark.parametrize("shape", [CONV, LINEAR])
def test_fully_dense_weight(shape):
    w = np.random.default_rng(4).uniform(0.5, 1.5, shape).astype(np.float32)
    csr = to_csr(w)
    assert csr.nnz == w.size and csr.sparsity == 0.0
    assert csr.nbytes == w.size * 8 + (shape[0] + 1) * 4
    bsr = to_bsr(w, (3, 2))
    assert bsr.nnz == w.size and bsr.sparsity == 0.0
    cols = int(np.prod(shape[1:]))
    assert bsr.nnz_blocks == -(-shape[0] // 3) * -(-cols // 2)
    assert csr.ell().data.shape == (shape[0], cols, 1, 1)
    np.testing.assert_array_equal(csr.to_dense(), w)
    np.testing.assert_array_equal(bsr.to_dense(), w)


# ----------------------------------------------------------------------------- ELL

@pytest.mark.parametrize("make", [to_csr, lambda w: to_bsr(w, (1, 1)), lambda w: to_bsr(w, (3, 2)),
                                  lambda w: to_bsr(w, (4, 1)), lambda w: to_bsr(w, (2, 7))],
                         ids=["csr", "bsr1x1", "bsr3x2", "bsr4x1", "bsr2x7"])
@pytest.mark.parametrize("shape", [CONV, LINEAR, (9, 5, 1, 1)])
def test_ell_reconstructs_dense(make, shape):
    w = random_weight(shape, sparsity=0.7, seed=5)
    w[1] = 0  # an empty row
    sp = make(w)
    np.testing.assert_array_equal(dense_from_ell(sp), w.reshape(shape[0], -1))


def test_csr_ell_padding_is_zero():
    w = np.zeros((3, 5), np.float32)
    w[0, [0, 2, 4]] = [1, 2, 3]
    w[2, 3] = 4
    ell = to_csr(w).ell()
    assert ell.data.shape == (3, 3, 1, 1)
    data, cols = ell.data[:, :, 0, 0], ell.cols[:, :, 0]
    # Rows by length: 0 (3 nonzeros), 2 (1), 1 (empty).
    np.testing.assert_array_equal(ell.perm, [0, 2, 1])
    np.testing.assert_array_equal(ell.lengths, [3, 1, 0])
    np.testing.assert_array_equal(data, [[1, 2, 3], [4, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(cols[0], [0, 2, 4])
    assert cols[1, 0] == 3
    # padding slots: zero data, in-bounds column
    for r in range(3):
        assert not data[r, ell.lengths[r]:].any()
        assert (cols[r, ell.lengths[r]:] == 0).all()


def test_ell_tiles_hold_rows_of_equal_length_and_threads_equal_work():
    lengths = np.random.default_rng(3).integers(0, 40, 256)
    w = np.zeros((256, 64), np.float32)
    for r, n in enumerate(lengths):
        w[r, :n] = 1
    ell = to_csr(w).ell()
    np.testing.assert_array_equal(ell.lengths, lengths[ell.perm])
    groups = ell.lengths.reshape(-1, 16)
    assert (np.diff(groups, axis=1) <= 0).all()  # sorted within each group of 16
    half = len(lengths) // 2  # what each of 2 threads gets from a static parallel loop
    assert abs(ell.lengths[:half].sum() - ell.lengths[half:].sum()) <= 0.05 * lengths.sum()


@pytest.mark.parametrize("per_chunk,chunks", [(9, 4), (18, 2), (36, 1), (3, 12)])
def test_ell_chunk_starts_bound_each_rows_nonzeros_of_a_chunk(per_chunk, chunks):
    """Slots ``starts[kb, c] .. starts[kb, c + 1]`` of table row kb hold exactly its nonzeros in
    columns ``c * per_chunk ..`` (rows of every length, an empty one included)."""
    w = random_weight((13, 4, 3, 3), 0.7, seed=per_chunk)
    w[5] = 0.0
    ell = to_csr(w).ell(4)
    starts = ell.chunk_starts(per_chunk, chunks)
    assert starts.shape == (13, chunks + 1) and (starts[:, -1] == ell.lengths).all()
    for kb in range(13):
        for c in range(chunks):
            cols = ell.cols[kb, starts[kb, c]:starts[kb, c + 1], 0]
            expected = np.flatnonzero(w[ell.perm[kb]].reshape(-1))
            assert list(cols) == [e for e in expected if c * per_chunk <= e < (c + 1) * per_chunk]


@pytest.mark.parametrize("per_chunk,chunks,group", [(9, 4, 4), (18, 2, 13), (36, 1, 1), (3, 12, 5)])
def test_chunk_major_tables_hold_each_rows_chunk_in_one_span_in_task_order(per_chunk, chunks, group):
    """Span [c, kb] of the reordered table, read row-major, holds exactly row kb's slots on
    chunk c (values and columns); the spans tile the table's first slots in the order a task
    of ``group`` rows reads them: group, then chunk, then row."""
    from fscnn_tvm.formats import chunk_major
    w = random_weight((13, 4, 3, 3), 0.7, seed=per_chunk + group)
    w[5] = 0.0
    ell = to_csr(w).ell(4)
    starts = ell.chunk_starts(per_chunk, chunks)
    data, cols, span = chunk_major(ell, starts, group)
    assert data.shape == ell.data.shape and cols.shape == ell.cols.shape and span.shape == (chunks, 13, 2)
    flat_data, flat_cols = data.reshape(-1), cols.reshape(-1)
    order = [(c, kb) for first in range(0, 13, group) for c in range(chunks)
             for kb in range(first, min(first + group, 13))]
    position = 0
    for c, kb in order:
        lo, hi = span[c, kb]
        assert lo == position
        np.testing.assert_array_equal(flat_data[lo:hi], ell.data[kb, starts[kb, c]:starts[kb, c + 1], 0, 0])
        np.testing.assert_array_equal(flat_cols[lo:hi], ell.cols[kb, starts[kb, c]:starts[kb, c + 1], 0])
        position = hi
    assert position == ell.lengths.sum() and not flat_data[position:].any()


def test_ell_chunk_starts_of_a_table_of_several_columns_per_slot_is_an_error():
    with pytest.raises(ValueError, match="one column per slot"):
        to_bsr(random_weight((8, 8)), (1, 2)).ell().chunk_starts(4, 2)


@pytest.mark.parametrize("channels,per_chunk,chunks,group", [(2, 9, 4, 3), (3, 18, 2, 1), (4, 36, 1, 8), (3, 3, 12, 2)])
def test_chunk_major_runs_a_shared_rows_slots_on_a_chunk_by_mask(channels, per_chunk, chunks, group):
    """A table of several channels per row (``shared_rows``): span [c, kb] holds where each mask's
    slots begin, then the end; a mask's slots are exactly the row's columns on chunk c whose
    nonzero channels are that mask, with their values (rows of every length, a partial last
    row, an empty channel)."""
    from fscnn_tvm.formats import chunk_major, shared_rows
    w = random_weight((13, 4, 3, 3), 0.6, seed=channels + per_chunk)
    w[5] = 0.0
    csr = to_csr(w)
    ell = shared_rows(csr, channels).ell(4)
    data, cols, span = chunk_major(ell, ell.chunk_starts(per_chunk, chunks), group)
    assert span.shape == (chunks, len(ell.lengths), 1 << channels)
    flat_data, flat_cols = data.reshape(-1, channels), cols.reshape(-1)
    dense = csr.to_dense().reshape(13, -1)
    seen = 0
    for c in range(chunks):
        for kb in range(len(ell.lengths)):
            assert (np.diff(span[c, kb]) >= 0).all()
            rows = ell.order[kb] * channels + np.arange(channels)
            for mask in range(1, 1 << channels):
                lo, hi = span[c, kb, mask - 1], span[c, kb, mask]
                members = [i for i in range(channels) if mask >> i & 1]
                expected = [col for col in range(c * per_chunk, (c + 1) * per_chunk)
                            if all((rows[i] < 13 and dense[rows[i], col] != 0) == (i in members)
                                   for i in range(channels))]
                assert sorted(flat_cols[lo:hi]) == expected
                for slot in range(lo, hi):
                    for i in range(channels):
                        value = dense[rows[i], flat_cols[slot]] if rows[i] < 13 else 0.0
                        assert flat_data[slot, i] == value
                seen += hi - lo
    used = np.pad(dense != 0, ((0, -13 % channels), (0, 0))).reshape(-1, channels, dense.shape[1]).any(axis=1)
    assert seen == used.sum()  # every column a group uses, once


def test_column_sharing_counts_nonzeros_per_distinct_column_of_a_group():
    from fscnn_tvm.formats import column_sharing, grouped_to_csr
    w = np.zeros((4, 6), np.float32)
    w[0, [0, 1]] = 1
    w[1, [1, 2]] = 1  # rows 0-1 share column 1: 4 nonzeros on 3 columns
    w[2, 5] = 1  # rows 2-3: 1 nonzero on 1 column
    assert column_sharing(to_csr(w), 2) == pytest.approx(5 / 4)
    assert column_sharing(to_csr(w), 1) == 1.0
    depthwise = grouped_to_csr(random_weight((8, 1, 3, 3)), 8)  # no two channels share an input
    assert column_sharing(depthwise, 3) == 1.0


def test_shared_rows_hold_the_same_weights():
    from fscnn_tvm.formats import shared_rows
    w = random_weight((10, 3, 3, 3), 0.7)
    table = shared_rows(to_csr(w), 3)
    assert table.block == (3, 1)
    np.testing.assert_array_equal(table.to_dense(), w)


def test_bsr_ell_keeps_a_partial_last_block_row_last():
    w = np.zeros((10, 8), np.float32)
    w[0, 0] = 1
    w[8:] = 1  # the heaviest rows are in the partial block row (rows 8, 9 of a 4-row block)
    ell = to_bsr(w, (4, 1)).ell()
    np.testing.assert_array_equal(ell.order, [0, 1, 2])
    np.testing.assert_array_equal(ell.lengths, [1, 0, 8])
    np.testing.assert_array_equal(dense_from_ell(to_bsr(w, (4, 1))), w)


def test_bsr_ell_padding_is_zero():
    w = random_weight((7, 10), sparsity=0.0, seed=6)
    w[3:6] = 0  # block row 1 (rows 3..5) is empty: all its slots are padding
    sp = to_bsr(w, (3, 4))
    ell = sp.ell()
    lengths = np.diff(sp.indptr)
    assert ell.data.shape == (3, int(lengths.max()), 3, 4)
    # Full block rows 0 and 1 by length; the partial block row 2 (row 6 only) stays last.
    np.testing.assert_array_equal(ell.order, [0, 1, 2])
    np.testing.assert_array_equal(ell.lengths, lengths)
    np.testing.assert_array_equal(ell.perm, np.arange(7))
    for kb, length in enumerate(lengths):
        assert not ell.data[kb, length:].any()
        assert (ell.cols[kb, length:] == 0).all()
    # Block column 2 covers columns 8..11 of a 10-column matrix: the two past the edge
    # hold zero data and point at column 0.
    edge = ell.cols == 0
    edge[:, :, 0] = False  # column 0 itself is legitimate in the first block
    assert not ell.data[np.broadcast_to(edge[:, :, None, :], ell.data.shape)].any()
    assert edge.any()
    np.testing.assert_array_equal(dense_from_ell(sp), w)


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("shape,rank", [((5,), 1), ((2, 3, 4), 3), ((2, 2, 2, 2, 2), 5), ((), 0)])
@pytest.mark.parametrize("convert", [to_csr, lambda w: to_bsr(w, (2, 2)), lambda w: to_format(w, "bsr")])
def test_bad_rank(shape, rank, convert):
    with pytest.raises(ValueError, match=rf"rank {rank}\b"):
        convert(np.ones(shape, np.float32))


@pytest.mark.parametrize("weight,pattern", [
    (np.array([["a", "b"], ["c", "d"]]), r"dtype <U1 cannot be cast to float32"),
    (np.array([[1.0, None], [2.0, 3.0]], dtype=object), r"dtype object cannot be cast to float32"),
    (np.array([[b"x"]]), r"cannot be cast to float32"),
    (np.array([[1 + 2j, 0]]), r"complex"),
    ([[1.0, 2.0], [3.0]], r"cannot be read as an array"),
])
def test_not_castable_to_float32(weight, pattern):
    with pytest.raises(ValueError, match=pattern):
        to_csr(weight)
    with pytest.raises(ValueError, match=pattern):
        to_bsr(weight, (1, 1))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("torch_input", [False, True])
def test_non_finite(bad, torch_input):
    w = random_weight(LINEAR, seed=7)
    w[2, 3] = bad
    w[4, 4] = bad
    src = torch.from_numpy(w) if torch_input else w
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\) \(NaN or inf\)"):
        to_csr(src)
    with pytest.raises(ValueError, match=r"non-finite"):
        to_bsr(src, (2, 2))


def test_float64_overflowing_float32_is_non_finite():
    w = np.ones((2, 2))
    w[0, 0] = 1e300  # finite in float64, inf in float32
    with np.errstate(over="ignore"), pytest.raises(ValueError, match=r"non-finite"):
        to_csr(w)


@pytest.mark.parametrize("block,pattern", [
    ((0, 1), r"positive"), ((1, 0), r"positive"), ((-2, 2), r"positive"), ((2, -1), r"positive"),
    ((0, 0), r"positive"),
    ((2,), r"pair"), ((1, 2, 3), r"pair"), (3, r"pair"), (None, r"pair"), (("a", "b"), r"pair"),
])
def test_bad_block(block, pattern):
    w = random_weight(LINEAR, seed=8)
    with pytest.raises(ValueError, match=pattern):
        to_bsr(w, block)
    if block is not None:
        with pytest.raises(ValueError, match=pattern):
            to_format(w, "bsr", block)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 2, 3, 3), (2, 0, 3, 3), (2, 2, 0, 3), (2, 2, 3, 0)])
def test_empty_dimension(shape):
    w = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=r"empty dimension"):
        to_csr(w)
    with pytest.raises(ValueError, match=r"empty dimension"):
        to_bsr(w, (1, 1))


@pytest.mark.parametrize("fmt", ["coo", "CSR", "", "ell", None])
def test_to_format_unknown(fmt):
    with pytest.raises(ValueError, match=r"unknown sparse format"):
        to_format(random_weight(LINEAR), fmt)


@pytest.mark.parametrize("block", [(2, 1), (1, 2), (4, 4), [3, 1], 3, (1,)])
def test_to_format_csr_with_block(block):
    with pytest.raises(ValueError, match=r"block"):
        to_format(random_weight(LINEAR), "csr", block)


def test_to_format_dispatch():
    w = random_weight(CONV, seed=9)
    assert isinstance(to_format(w, "csr"), CSR)
    assert isinstance(to_format(w, "csr", (1, 1)), CSR)
    bsr = to_format(w, "bsr")
    assert isinstance(bsr, BSR) and bsr.block == (4, 1)
    assert to_format(w, "bsr", (2, 3)).block == (2, 3)
    np.testing.assert_array_equal(to_format(w, "bsr", (2, 3)).to_dense(), w)


def test_inconsistent_constructor_arrays():
    with pytest.raises(ValueError, match=r"CSR: inconsistent"):
        CSR([1.0], [0], [0, 2], (1, 3))
    with pytest.raises(ValueError, match=r"CSR: column index out of range"):
        CSR([1.0], [3], [0, 1], (1, 3))
    with pytest.raises(ValueError, match=r"BSR: inconsistent"):
        BSR(np.ones((1, 2, 2)), [0], [0, 1], (2, 4), (2, 1))
    with pytest.raises(ValueError, match=r"BSR: block column index out of range"):
        BSR(np.ones((1, 2, 2)), [2], [0, 1], (2, 4), (2, 2))


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.int64, np.int8, np.uint8, np.bool_])
def test_dtype_cast_to_float32(dtype):
    rng = np.random.default_rng(10)
    w = (rng.integers(-3, 4, CONV) * (rng.random(CONV) < 0.5)).astype(dtype)
    if dtype == np.float64:
        w = w + 0.1 * (w != 0)
    for sp in (to_csr(w), to_bsr(w, (3, 2))):
        assert sp.data.dtype == np.float32
        back = sp.to_dense()
        assert back.dtype == np.float32
        np.testing.assert_array_equal(back, w.astype(np.float32))
        assert sp.nnz == np.count_nonzero(w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int32, torch.int64])
def test_torch_dtype_cast_to_float32(dtype):
    w = torch.tensor([[0, 1, 2], [3, 0, 0]]).to(dtype)
    back = to_csr(w).to_dense()
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, [[0, 1, 2], [3, 0, 0]])


def test_as_weight_names_argument():
    with pytest.raises(ValueError, match=r"^bias: "):
        F.as_weight(np.array([np.nan]), "bias")
    out = F.as_weight([[1, 2]], "x")
    assert out.dtype == np.float32 and out.flags.c_contiguous
    out = F.as_weight(np.arange(12, dtype=np.float64).reshape(3, 4).T, "x")
    assert out.dtype == np.float32 and out.flags.c_contiguous


@pytest.mark.parametrize("k,c,groups,kh", [(8, 8, 8, 3), (12, 6, 3, 3), (4, 4, 1, 1), (6, 4, 2, 5)])
def test_grouped_csr_is_the_block_diagonal_weight(k, c, groups, kh):
    rng = np.random.default_rng(k * c + groups)
    w = rng.standard_normal((k, c // groups, kh, kh)).astype(np.float32)
    w[rng.random(w.shape) < 0.3] = 0.0
    full = np.zeros((k, c, kh, kh), np.float32)
    for g in range(groups):
        rows, cols = slice(g * k // groups, (g + 1) * k // groups), slice(g * c // groups, (g + 1) * c // groups)
        full[rows, cols] = w[rows]
    csr = F.grouped_to_csr(w, groups)
    assert csr.shape == (k, c, kh, kh) and csr.nnz == np.count_nonzero(w)
    np.testing.assert_array_equal(csr.to_dense(), full)


@pytest.mark.parametrize("groups", [0, 5])
def test_grouped_csr_rejects_groups_that_do_not_divide(groups):
    with pytest.raises(ValueError, match="groups"):
        F.grouped_to_csr(np.ones((8, 1, 3, 3), np.float32), groups)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 12), parts=st.sampled_from([1, 2, 4]), per_part=st.integers(1, 6),
       taps=st.sampled_from([(1, 1), (3, 3)]), seed=st.integers(0, 10**6))
def test_split_columns_holds_each_row_once_per_range_of_input_channels(k, parts, per_part, taps, seed):
    w = random_weight((k, parts * per_part) + taps, 0.6, seed)
    split = F.split_columns(to_csr(w), parts)
    assert split.shape == (parts * k, parts * per_part) + taps and split.nnz == np.count_nonzero(w)
    dense = split.to_dense().reshape(parts, k, parts, per_part, *taps)
    for p in range(parts):
        for q in range(parts):
            expected = w.reshape(k, parts, per_part, *taps)[:, q] if p == q else 0.0
            np.testing.assert_array_equal(dense[p, :, q], expected)
    # Each part's table rows stay together, in the part's place: one core runs them.
    for table in (split, F.shared_rows(split, 2)) if k % 2 == 0 else (split,):
        perm = table.ell(4, parts).perm
        for p in range(parts):
            assert set(perm[p * k:(p + 1) * k]) == set(range(p * k, (p + 1) * k))


def test_split_columns_and_parts_that_do_not_divide_are_clear_errors():
    w = random_weight((4, 6, 1, 1))
    with pytest.raises(ValueError, match="do not divide the 6 input channels"):
        F.split_columns(to_csr(w), 4)
    with pytest.raises(ValueError, match="4 block rows do not split into 3 equal parts"):
        to_csr(w).ell(1, 3)
