"""Sparse weight formats.

A conv weight (O, I, KH, KW) is seen as a matrix of O rows (output channels) and I*KH*KW
columns, a linear weight (O, I) as itself. CSR and BSR store that matrix; both know how to
lay themselves out as a *blocked ELL* table (``ell()``), the one layout the operators in
``fscnn_tvm.ops`` consume. A new format only has to produce that table, so the operators and
their callers never change when one is added (SparseTIR's "formats compose" idea).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INDEX_DTYPE = np.int32


def as_array(value, name: str) -> np.ndarray:
    """Return ``value`` (numpy array or torch tensor) as a float32 numpy array."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except Exception as err:  # ragged lists and the like
        raise ValueError(f"{name}: cannot be read as an array ({err})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name}: dtype {arr.dtype} cannot be cast to float32")
    if np.iscomplexobj(arr):
        raise ValueError(f"{name}: complex dtype {arr.dtype} cannot be cast to float32")
    return np.asarray(arr, dtype=np.float32, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d


def as_weight(weight, name: str = "weight") -> np.ndarray:
    """Return ``weight`` (or a bias) as a finite float32 numpy array. A NaN or inf weight is an
    error naming the tensor: it comes from a broken model and would turn every output it reads
    non-finite. Inputs are not checked (``as_array``; see ``fscnn_tvm.layer``)."""
    arr = as_array(weight, name)
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name}: {bad} non-finite value(s) (NaN or inf); prune or fix them first")
    return arr


def _as_matrix(weight) -> tuple[np.ndarray, tuple[int, ...]]:
    arr = as_weight(weight)
    if arr.ndim not in (2, 4):
        raise ValueError(
            f"weight: rank {arr.ndim} (shape {arr.shape}); expected 4 (conv, O x I x KH x KW) "
            "or 2 (linear, out x in)")
    if 0 in arr.shape:
        raise ValueError(f"weight: shape {arr.shape} has an empty dimension")
    return arr.reshape(arr.shape[0], -1), arr.shape


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_block(block) -> tuple[int, int]:
    try:
        if isinstance(block, (str, bytes)) or len(block) != 2 or \
                not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in block):
            raise TypeError
        bo, bi = (int(b) for b in block)
    except TypeError:
        raise ValueError(f"block: expected a pair (rows, cols) of positive ints, got {block!r}") from None
    if bo <= 0 or bi <= 0:
        raise ValueError(f"block: both sides must be positive, got {(bo, bi)}")
    return bo, bi


# Sorted block rows are dealt out in groups of this many, heaviest and lightest alternating:
# a kernel's tile of adjacent rows (at most 8 here) then holds rows of near-equal length, while
# any contiguous share of the rows, which is what a static parallel loop gives each thread,
# holds about the average work.
SORT_GROUP = 16


@dataclass(frozen=True)
class Ell:
    """Blocked ELL table: every block row holds ``width`` blocks of ``bo x bi`` values.

    ``data[kb, w, io, ii]`` multiplies column ``cols[kb, w, ii]``. Rows shorter than ``width``
    are padded with zero blocks pointing at column 0, so padding reads valid memory and adds 0.
    Only the first ``lengths[kb]`` slots of a block row hold blocks, so a kernel may stop there.

    Block rows are stored grouped by length (``order[kb]`` is the matrix block row held by
    table row kb), so a tile of adjacent rows pads little; ``perm`` maps each table channel to
    its matrix row (output channel). A partial last block row stays last, so table channels
    ``0 .. rows-1`` are exactly the real ones.
    """
    data: np.ndarray  # (KB, W, bo, bi) float32
    cols: np.ndarray  # (KB, W, bi) int32
    rows: int  # the unpadded number of output rows (channels)
    lengths: np.ndarray  # (KB,) int32
    order: np.ndarray  # (KB,) int32

    @property
    def perm(self) -> np.ndarray:
        bo = self.data.shape[2]
        channel = np.arange(self.rows)
        return (self.order[channel // bo] * bo + channel % bo).astype(INDEX_DTYPE)

    def chunk_starts(self, cols_per_chunk: int, chunks: int) -> np.ndarray:
        """(KB, chunks + 1): the slot where each row's nonzeros of columns from ``c *
        cols_per_chunk`` on begin (the last entry its length), a row's slots being in column
        order; a table of one column per slot (blocks of one column) only."""
        if self.cols.shape[2] != 1:
            raise ValueError("chunk_starts: a table of one column per slot only")
        used = np.arange(self.cols.shape[1])[None, :] < self.lengths[:, None]
        chunk = np.where(used, self.cols[:, :, 0] // cols_per_chunk, chunks)
        if used.any() and (np.diff(np.where(used, self.cols[:, :, 0], np.iinfo(INDEX_DTYPE).max), axis=1) < 0).any():
            raise ValueError("chunk_starts: a row's slots are not in column order")
        starts = np.zeros((len(self.lengths), chunks + 1), INDEX_DTYPE)
        starts[:, 1:] = (chunk[:, :, None] < np.arange(1, chunks + 1)[None, None, :]).sum(axis=1)
        return starts


def chunk_major(ell: Ell, starts: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, cols, span) of ``ell``'s table with its slots reordered for a kernel that runs a
    group of ``group`` rows on one chunk of columns, then on the next: for each group of rows,
    for each chunk, each row's slots on that chunk (``starts``: ``chunk_starts``), one after the
    other from the table's first slot on, so a task reads its weights in one stream instead of a
    short run from every row. Positions count the table read row-major (it keeps its shape; its
    padding follows). ``span[c, kb]`` holds 2**bo entries: a table of one channel per row
    (bo = 1) gives [first, end) of row kb's slots on chunk c; a table of bo channels per row
    (blocks of bo x 1) orders each row's slots on a chunk by *mask*, the set of its bo channels
    whose weight is nonzero, and gives where each mask's slots begin (masks 1 .. 2**bo - 1),
    then the end, so a kernel can run each mask's slots with only that mask's channels' FMAs
    (slots of no nonzero weight are left out)."""
    n_kb, width, bo = ell.data.shape[:3]
    chunks = starts.shape[1] - 1
    # Each slot's chunk (``chunks``: past the row's end) and mask; a sort by (group of rows, chunk,
    # row, mask, slot) of the slots of some nonzero weight gives each its position.
    chunk = (np.arange(width)[None, :, None] >= starts[:, None, 1:]).sum(axis=2)
    masks = (ell.data[:, :, :, 0] != 0) @ (1 << np.arange(bo))
    kb, w = np.nonzero((chunk < chunks) & (masks != 0))
    order = np.lexsort((w, masks[kb, w], kb, chunk[kb, w], kb // group))
    data, cols = np.zeros_like(ell.data), np.zeros_like(ell.cols)
    for table, source in ((data, ell.data), (cols, ell.cols)):  # (the table read row-major, slot by slot)
        per_slot = int(np.prod(source.shape[2:]))
        table.reshape(n_kb * width, per_slot)[:len(order)] = source[kb[order], w[order]].reshape(len(order), per_slot)
    # Slots per (chunk, row, mask), and where each (chunk, row) begins: the slots of every
    # (chunk, row) before it in the same (group, chunk, row) order.
    counts = np.zeros((chunks, n_kb, 1 << bo), np.int64)
    np.add.at(counts, (chunk[kb, w], kb, masks[kb, w]), 1)
    c_all, kb_all = np.meshgrid(np.arange(chunks), np.arange(n_kb), indexing="ij")
    sequence = np.lexsort((kb_all.ravel(), c_all.ravel(), kb_all.ravel() // group))
    totals = counts.sum(axis=2).ravel()[sequence]
    begin = np.zeros(chunks * n_kb, np.int64)
    begin[sequence] = np.cumsum(totals) - totals
    span = np.zeros((chunks, n_kb, 1 << bo), INDEX_DTYPE)
    span[:, :, 0] = begin.reshape(chunks, n_kb)
    span[:, :, 1:] = span[:, :, :1] + np.cumsum(counts[:, :, 1:], axis=2)
    return data, cols, span


def interleave_rows(table: np.ndarray, group: int) -> np.ndarray:
    """``table`` (rows, slots, ...) with each group of ``group`` rows stored slot by slot: the
    element of row r and slot w at flat position ((r // group) * slots + w) * group + r % group
    (of its rows x slots layout), the shape unchanged; ``group`` must divide the rows."""
    rows, slots = table.shape[:2]
    if rows % group:
        raise ValueError(f"interleave_rows: {group} does not divide the table's {rows} rows")
    return np.ascontiguousarray(table.reshape((rows // group, group, slots) + table.shape[2:])
                                .swapaxes(1, 2).reshape(table.shape))


def _row_order(lengths: np.ndarray, full_rows: int, parts: int = 1) -> np.ndarray:
    """Block rows by length, groups of SORT_GROUP dealt heaviest, lightest, next heaviest...;
    rows from ``full_rows`` on (a partial last block) stay at the end. With ``parts``, each of
    that many equal ranges of rows is ordered on its own and keeps its place (``split_columns``:
    a part's rows are one core's)."""
    if parts > 1:
        if full_rows != len(lengths) or full_rows % parts:
            raise ValueError(f"{len(lengths)} block rows do not split into {parts} equal parts")
        size = full_rows // parts
        return np.concatenate([p * size + _row_order(lengths[p * size:(p + 1) * size], size)
                               for p in range(parts)]).astype(INDEX_DTYPE)
    by_length = np.argsort(-lengths[:full_rows], kind="stable")
    groups = [by_length[i:i + SORT_GROUP] for i in range(0, full_rows, SORT_GROUP)]
    dealt = [groups[i // 2] if i % 2 == 0 else groups[-1 - i // 2] for i in range(len(groups))]
    return np.concatenate(dealt + [np.arange(full_rows, len(lengths))]).astype(INDEX_DTYPE)


def _ell(lengths, width_multiple, values, columns, block, rows, parts=1) -> Ell:
    """The table of blocks ``values`` (nnz, bo, bi) at ``columns`` (nnz, bi), block row j
    holding ``lengths[j]`` of them in order."""
    n_brows, bo = len(lengths), block[0]
    order = _row_order(lengths, rows // bo, parts)
    width = round_up(max(1, int(lengths.max())), width_multiple)
    table_row = np.empty(n_brows, np.int64)
    table_row[order] = np.arange(n_brows)
    starts = np.cumsum(lengths) - lengths
    slot = np.arange(len(values)) - np.repeat(starts, lengths)
    row_of = np.repeat(table_row, lengths)
    data = np.zeros((n_brows, width) + values.shape[1:], np.float32)
    cols = np.zeros((n_brows, width, columns.shape[1]), INDEX_DTYPE)
    data[row_of, slot] = values
    cols[row_of, slot] = columns
    return Ell(data, cols, rows, lengths[order].astype(INDEX_DTYPE), order)


class SparseMatrix:
    """What every format shares: shape bookkeeping, statistics, dense round trip."""
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return int(np.prod(self.shape[1:]))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.size

    @property
    def dense_nbytes(self) -> int:
        return self.size * 4

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.shape}, nnz={self.nnz}, "
                f"sparsity={self.sparsity:.3f}, nbytes={self.nbytes})")


class CSR(SparseMatrix):
    """Compressed sparse rows: ``data[indptr[r]:indptr[r+1]]`` are row r's values at
    columns ``indices[...]``; columns index (in_channel, kh, kw) in C order for conv weights."""

    def __init__(self, data, indices, indptr, shape):
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.indices = np.ascontiguousarray(indices, dtype=INDEX_DTYPE)
        self.indptr = np.ascontiguousarray(indptr, dtype=INDEX_DTYPE)
        self.shape = tuple(int(s) for s in shape)
        if self.indptr.shape != (self.rows + 1,) or self.indptr[-1] != len(self.data) \
                or len(self.indices) != len(self.data) or np.any(np.diff(self.indptr) < 0):
            raise ValueError(f"CSR: inconsistent arrays for shape {self.shape}")
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= self.cols):
            raise ValueError(f"CSR: column index out of range [0, {self.cols})")

    @property
    def nnz(self) -> int:
        return len(self.data)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.indices.nbytes + self.indptr.nbytes

    def to_dense(self) -> np.ndarray:
        dense = np.zeros((self.rows, self.cols), np.float32)
        row_of = np.repeat(np.arange(self.rows), np.diff(self.indptr))
        dense[row_of, self.indices] = self.data
        return dense.reshape(self.shape)

    def ell(self, width_multiple: int = 1, parts: int = 1) -> Ell:
        return _ell(np.diff(self.indptr), width_multiple, self.data[:, None, None], self.indices[:, None],
                    (1, 1), self.rows, parts)


class BSR(SparseMatrix):
    """Block sparse rows: ``data[j]`` is a ``bo x bi`` block at block row r (indptr) and
    block column ``indices[j]``. Row and column counts the block does not divide are padded
    with zeros inside the last block; ``to_dense`` crops them off again."""

    def __init__(self, data, indices, indptr, shape, block):
        self.block = _check_block(block)
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.indices = np.ascontiguousarray(indices, dtype=INDEX_DTYPE)
        self.indptr = np.ascontiguousarray(indptr, dtype=INDEX_DTYPE)
        self.shape = tuple(int(s) for s in shape)
        bo, bi = self.block
        n_brows, n_bcols = -(-self.rows // bo), -(-self.cols // bi)
        if self.indptr.shape != (n_brows + 1,) or self.indptr[-1] != len(self.data) \
                or self.data.shape[1:] != (bo, bi) or len(self.indices) != len(self.data):
            raise ValueError(f"BSR: inconsistent arrays for shape {self.shape} block {self.block}")
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= n_bcols):
            raise ValueError(f"BSR: block column index out of range [0, {n_bcols})")

    @property
    def nnz(self) -> int:
        """Nonzero *values* (zeros stored inside kept blocks do not count)."""
        return int(np.count_nonzero(self.data))

    @property
    def nnz_blocks(self) -> int:
        return len(self.data)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.indices.nbytes + self.indptr.nbytes

    def _padded(self) -> np.ndarray:
        bo, bi = self.block
        n_brows = len(self.indptr) - 1
        n_bcols = -(-self.cols // bi)
        blocks = np.zeros((n_brows, n_bcols, bo, bi), np.float32)
        brow_of = np.repeat(np.arange(n_brows), np.diff(self.indptr))
        blocks[brow_of, self.indices] = self.data
        return blocks.transpose(0, 2, 1, 3).reshape(n_brows * bo, n_bcols * bi)

    def to_dense(self) -> np.ndarray:
        return np.ascontiguousarray(self._padded()[:self.rows, :self.cols]).reshape(self.shape)

    def ell(self, width_multiple: int = 1, parts: int = 1) -> Ell:
        bi = self.block[1]
        col = self.indices[:, None] * bi + np.arange(bi)[None, :]
        # Columns past the matrix edge hold zero weights; point them at column 0 to stay in bounds.
        return _ell(np.diff(self.indptr), width_multiple, self.data, np.where(col < self.cols, col, 0),
                    self.block, self.rows, parts)


def _indptr(row_of: np.ndarray, rows: int) -> np.ndarray:
    """A CSR's row pointers from each nonzero's row (nonzeros stored row by row)."""
    indptr = np.zeros(rows + 1, INDEX_DTYPE)
    np.cumsum(np.bincount(row_of, minlength=rows), out=indptr[1:])
    return indptr


def to_csr(weight) -> CSR:
    """CSR of a dense OIHW conv weight or (out, in) linear weight (numpy or torch)."""
    mat, shape = _as_matrix(weight)
    rows, cols = np.nonzero(mat)
    return CSR(mat[rows, cols], cols, _indptr(rows, mat.shape[0]), shape)


def grouped_to_csr(weight, groups: int) -> CSR:
    """CSR of a grouped conv weight (K, C/groups, kh, kw) as the block-diagonal (K, C, kh, kw)
    weight it stands for (a depthwise conv: one channel's kh*kw taps per row), built without
    the dense block-diagonal matrix. Zero weights are dropped like any others."""
    w = as_weight(weight)
    if w.ndim != 4:
        raise ValueError(f"weight: expected a grouped conv weight (K, C/groups, kh, kw), got shape {w.shape}")
    k, per_group, kh, kw = w.shape
    if groups < 1 or k % groups:
        raise ValueError(f"groups={groups} must divide the {k} output channels")
    mat = w.reshape(k, per_group * kh * kw)
    rows, cols = np.nonzero(mat)
    shifted = cols + rows // (k // groups) * per_group * kh * kw
    return CSR(mat[rows, cols], shifted, _indptr(rows, k), (k, per_group * groups, kh, kw))


def to_bsr(weight, block=(4, 1)) -> BSR:
    """BSR with ``block=(bo, bi)``: bo output channels x bi columns. A block is kept when any
    of its values is nonzero."""
    bo, bi = _check_block(block)
    mat, shape = _as_matrix(weight)
    rows, cols = mat.shape
    n_brows, n_bcols = -(-rows // bo), -(-cols // bi)
    padded = np.zeros((n_brows * bo, n_bcols * bi), np.float32)
    padded[:rows, :cols] = mat
    blocks = padded.reshape(n_brows, bo, n_bcols, bi).transpose(0, 2, 1, 3)
    keep = blocks.any(axis=(2, 3))
    brow, bcol = np.nonzero(keep)
    indptr = np.zeros(n_brows + 1, INDEX_DTYPE)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return BSR(blocks[brow, bcol], bcol, indptr, shape, (bo, bi))


def column_sharing(csr: CSR, rows: int) -> float:
    """Nonzeros per distinct column within each group of ``rows`` consecutive rows (1.0: none
    of a group's rows shares a column): the FMAs a window loaded once serves in
    ``shared_rows(csr, rows)``'s table."""
    row = np.repeat(np.arange(csr.rows), np.diff(csr.indptr))
    distinct = np.unique((row // rows).astype(np.int64) * csr.cols + csr.indices).size
    return csr.nnz / distinct if distinct else 1.0


def split_columns(csr: CSR, parts: int) -> CSR:
    """A conv's weights split over ``parts`` equal ranges of input channels: the (parts * K)-row
    weight whose rows ``p*K .. (p+1)*K - 1`` hold each output channel's nonzeros of range p (its
    product with the input is the ``parts`` partial sums, one after the other). A kernel whose
    tasks run a part's rows on the core that wrote that range of its input reads nothing the
    other cores wrote (``emit``: a pointwise conv after our depthwise kernel)."""
    channels = csr.shape[1] if len(csr.shape) == 4 else csr.cols
    if parts < 1 or channels % parts:
        raise ValueError(f"split_columns: {parts} parts do not divide the {channels} input channels")
    k, per_part = csr.rows, csr.cols // parts  # columns run (channel, r, s): a channel range is a column range
    row = np.repeat(np.arange(k), np.diff(csr.indptr))
    new_row = csr.indices // per_part * k + row
    order = np.argsort(new_row, kind="stable")  # row-major, each row's columns still ascending
    return CSR(csr.data[order], csr.indices[order], _indptr(new_row, parts * k), (parts * k,) + tuple(csr.shape[1:]))


def shared_rows(csr: CSR, rows: int) -> BSR:
    """The same weights as a table of ``rows`` channels per row (blocks of ``rows`` x 1): each
    slot one input column that any of them uses, zeros stored for the others. A kernel loads
    the slot's window once for all of them and, running a row's slots grouped by which of its
    channels are nonzero (``chunk_major``), multiplies no zero."""
    return to_bsr(csr.to_dense(), (rows, 1))


def to_format(weight, fmt: str = "csr", block=None) -> SparseMatrix:
    """``to_csr`` or ``to_bsr`` by name; ``block`` is only meaningful for BSR."""
    if fmt == "csr":
        if block is not None and _check_block(block) != (1, 1):
            raise ValueError(f"block={block!r} given with fmt='csr'; use fmt='bsr' for blocks")
        return to_csr(weight)
    if fmt == "bsr":
        return to_bsr(weight, block if block is not None else (4, 1))
    raise ValueError(f"fmt: unknown sparse format {fmt!r}; expected 'csr' or 'bsr'")
