"""Conv layer geometry: the shape facts every conv kernel (sparse or dense) is specialised on,
and the padded, stride-phase-split input layout the sparse kernels read."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import formats as F


DYNAMIC = -1  # the batch of a kernel built for every batch size: one symbolic dimension


def with_batch(shape, batch) -> tuple:
    """``shape`` with its first (batch) dimension replaced by ``batch``."""
    return (batch,) + tuple(shape[1:])


def batch_extent(batch):
    """The batch extent a kernel's tensors take: the int, or one symbolic var for DYNAMIC (make
    it once per kernel: every tensor of the kernel must share it)."""
    if batch != DYNAMIC:
        return batch
    from tvm import te
    return te.var("batch", "int64")


def _ints(value, name, expected):
    """``value`` as a tuple of ints, from one int or a sequence of ints; anything else is an
    error naming the argument (``int()`` would truncate 1.5 silently)."""
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if is_int(value):
        return (int(value),)
    if isinstance(value, (tuple, list, np.ndarray)) and all(is_int(v) for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _pair(value, name):
    expected = "an int or a pair of ints"
    vals = _ints(value, name, expected)
    if len(vals) == 1:
        return vals * 2
    if len(vals) != 2:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return vals


def _padding4(padding):
    """PyTorch-style padding (int or (pad_h, pad_w)) or (top, left, bottom, right)."""
    if isinstance(padding, str):
        raise ValueError(f"padding: string padding {padding!r} is not supported; give ints")
    expected = "an int, (pad_h, pad_w) or (top, left, bottom, right) of ints"
    vals = _ints(padding, "padding", expected)
    if len(vals) == 1:
        return vals * 4
    if len(vals) == 2:
        return vals[0], vals[1], vals[0], vals[1]
    if len(vals) == 4:
        return vals
    raise ValueError(f"padding: expected {expected}, got {padding!r}")


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a conv layer's shapes that the kernel is specialised on."""
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kh: int
    kw: int
    stride: tuple
    pad: tuple  # top, left, bottom, right
    dilation: tuple

    @classmethod
    def create(cls, x_shape, w_shape, stride=1, padding=0, dilation=1):
        if len(x_shape) != 4:
            raise ValueError(f"x: expected NCHW (rank 4), got shape {tuple(x_shape)}")
        if len(w_shape) != 4:
            raise ValueError(f"weight: expected OIHW (rank 4), got shape {tuple(w_shape)}")
        n, c, h, w = (int(s) for s in x_shape)
        k, wc, kh, kw = (int(s) for s in w_shape)
        if wc != c:
            raise ValueError(f"weight has {wc} input channels but x has {c} (shapes {tuple(w_shape)}, {tuple(x_shape)})")
        geo = cls(n, c, h, w, k, kh, kw, _pair(stride, "stride"), _padding4(padding), _pair(dilation, "dilation"))
        if min(geo.stride) < 1 or min(geo.dilation) < 1 or min(geo.pad) < 0:
            raise ValueError(f"stride and dilation must be >= 1 and padding >= 0: {geo.stride}, {geo.dilation}, {geo.pad}")
        if min(n, c, h, w) < 1:
            raise ValueError(f"x: shape {tuple(x_shape)} has an empty dimension")
        if geo.out_height < 1 or geo.out_width < 1:
            raise ValueError(f"output would be empty: input {h}x{w}, kernel {kh}x{kw}, "
                             f"padding {geo.pad}, dilation {geo.dilation}")
        return geo

    @property
    def out_height(self):
        return (self.height + self.pad[0] + self.pad[2] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1

    @property
    def out_width(self):
        return (self.width + self.pad[1] + self.pad[3] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1

    @property
    def phases(self):
        return self.stride[0] * self.stride[1]

    @property
    def phase_height(self):
        return self.out_height + (self.kh - 1) * self.dilation[0] // self.stride[0]

    @property
    def phase_width(self):
        return self.out_width + (self.kw - 1) * self.dilation[1] // self.stride[1]

    @property
    def reach(self):
        """Phase columns a tap's window can start right of its output column (the kernel's width
        as the stride phases see it)."""
        return self.phase_width - self.out_width

    @property
    def out_shape(self):
        return (self.batch, self.out_channels, self.out_height, self.out_width)

    def inside(self, row, col):
        """The TIR condition that input pixel (row, col) lies in the image (not in its padding)."""
        import tvm
        return tvm.tirx.all(row >= 0, row < self.height, col >= 0, col < self.width)

    def band_height(self, band_rows: int | None) -> int:
        """Phase rows a band of ``band_rows`` output rows reads (None: the whole image)."""
        return self.phase_height if band_rows is None else band_rows + self.phase_height - self.out_height

    def identity_layout(self, padded_width: int) -> bool:
        """Whether the padded, phase-split layout would be the input itself: no padding, no
        stride phases, no zero tail after rows of ``padded_width`` output columns."""
        return max(self.pad) == 0 and self.stride == (1, 1) and padded_width == self.out_width


# The smallest page of x86-64 and AArch64 Linux: no virtually indexed L1d way is larger.
PAGE_BYTES = 4096


class NCHWShapes:
    """The shapes of a kernel spec whose ``geo`` is the layer's own: NCHW input and output as the
    geometry says (kernels that view them otherwise override these)."""

    @property
    def x_shape(self):
        g = self.geo
        return (g.batch, g.in_channels, g.height, g.width)

    @property
    def out_shape(self):
        return self.geo.out_shape

    @property
    def layer_out_shape(self):
        return self.out_shape

    @property
    def out_features(self):
        return self.geo.out_channels


@dataclass(frozen=True)
class InputLayout:
    """The padded, phase-split input a sparse conv reads its windows from: per input channel
    and stride phase, ``rows`` phase rows (a band's, when laid out per band of ``band_rows``
    output rows) ``width`` floats apart. A window starts at its tap's row and column offset.
    Rows of whole vectors (``width`` a multiple of the vector width) start aligned, so every
    window of a tap at column offset 0 loads whole vectors that never straddle a cache line
    (an unaligned vector load that does costs two loads)."""
    geo: ConvGeometry
    band_rows: int | None = None
    row_width: int | None = None
    # Interleaved rows: a row of ``interleave`` vectors of ``lanes`` floats per output row, lane i
    # of vector j holding phase column j + i * interleave (the row's columns dealt across the
    # lanes), then one more vector per column a tap reaches right. A tap s columns right reads
    # its window s whole vectors on: every window load aligned (``KernelSpec.interleaved``).
    interleave: int | None = None
    lanes: int = 1

    @property
    def width(self):
        if self.interleave:
            return (self.interleave + self.geo.reach) * self.lanes
        return self.row_width or self.geo.phase_width

    @property
    def rows_first(self):
        """Whether the layout pass copies each channel's padded rows first and picks the column
        phases from them (a column stride, one layout for the image, rows not interleaved)."""
        return self.band_rows is None and self.geo.stride[1] > 1 and not self.interleave

    def phase_column(self, p):
        """The phase column at position ``p`` of a layout row."""
        return p // self.lanes + p % self.lanes * self.interleave if self.interleave else p

    @property
    def rows(self):
        """Rows of a channel's phase plane: the band's (or image's) phase rows, and one more
        where a channel would span a whole number of pages. A virtually indexed L1d's way is at
        most a page, so at such a stride every channel's window starts on the same cache sets,
        and a chunk of channels (``tiles.chunking``) whose windows fit the L1d by size evicts
        itself: 128->128 3x3 at 112x112, 90 % (bands of 16 rows of 128 floats: 8 KiB a
        channel, chunks of 16), 1.13x with the extra row on a Sapphire Rapids class Xeon."""
        rows = self.geo.band_height(self.band_rows)
        return rows + (self.geo.phases * rows * self.width * 4 % PAGE_BYTES == 0)

    @property
    def size(self):
        """Floats of one image's (or one band's) layout."""
        return self.geo.in_channels * self.geo.phases * self.rows * self.width

    def offsets(self, cols: np.ndarray) -> np.ndarray:
        """Map weight columns (c, r, s) to their window start in the layout."""
        geo = self.geo
        c, rs = np.divmod(cols.astype(np.int64), geo.kh * geo.kw)
        r, s = np.divmod(rs, geo.kw)
        rr, ss = r * geo.dilation[0], s * geo.dilation[1]
        sh, sw = geo.stride
        q = (rr % sh) * sw + ss % sw
        column = ss // sw * (self.lanes if self.interleave else 1)  # (interleaved: whole vectors on)
        off = ((c * geo.phases + q) * self.rows + rr // sh) * self.width + column
        return off.astype(F.INDEX_DTYPE)
