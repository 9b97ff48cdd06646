"""Dense 3x3 convs by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, CVPR 2016): each 4x4
tile of output is computed from a 6x6 tile of input with 36 multiplies per (input, output)
channel pair where the direct conv takes 144, so a dense 3x3 layer does a quarter of the
multiplies; what is left is a product of 36 matrices and two cheap transforms.

Three stages in one kernel, NCHW in and out:
- input transform: ``V[e1, e2, c, p] = (B^T d B)[e1, e2]`` for each input channel c and tile p
  (tiles over images, tile rows, tile columns), from a zero-padded copy of the input, rows then
  columns; a task is one channel's row of tiles, its tiles in the lanes (the 6 columns a tile
  reads are 4 apart from one tile to the next: strided loads the pipeline turns into shuffles);
- product: ``M[e1, e2, p, k] = sum_c V[e1, e2, c, p] U[e1, e2, c, k]`` with the weights
  transformed ahead of time (``U = G g G^T``, output channels padded to whole register tiles),
  a register tile of ``pixel_tile`` tiles x ``k_vectors`` channel vectors, as the dense kernel's;
- output transform ``A^T M A`` per row of tiles, then, in the same task while its products are
  in cache, bias, residual and activation on the way to NCHW, a vector of pixels a store (the
  products' channel vectors transposed in registers: ``transposed``).
The input transform and the product each a parallel loop over all tiles, or, where the
transformed weights are small next to the transformed tensors (``blocked``: VGG16's 64- and
128-channel layers on 112- and 224-pixel maps), one parallel loop over blocks of tile rows that
runs all three stages on its block while its tensors are in cache.

Where it applies (``applies``): measured on a Zen 4 (2 threads, b1; ``docs/performance.md``,
"Winograd"), against our direct dense kernel: 64@56 2.0x, 256@56 2.15x, 512@28 1.73x, 128@28 1.41x,
256@14 1.31x, 128@112 1.48x; blocked 64@224 1.34-1.50x, 64->128@112 1.63x (unblocked 1.12x); at
batch 8 128@28 1.59x, 256@14 1.51x, 512@7 1.17x, 64@56 1.10x. It loses where tiles are few (512@7
at batch 1: 4 tiles, 0.26x) or channels few (16->32: 0.57x, a 3-channel stem 0.13x).
fp32 error grows with the transform: ~5e-6 of the output's scale on these layers (direct: ~1e-7).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te
from tvm.topi import utils as topi_utils
from tvm.topi.nn import winograd_util

from .decisions import TRANSPOSE_ATTR, FixedDecisions
from .geometry import ConvGeometry, NCHWShapes
from .ops import ACTIVATIONS, activate
from .target import Caches, caches, vector_lanes, vector_registers

TILE = 4  # output rows and columns of a tile
ALPHA = TILE + 2  # input rows and columns a tile reads
# Fewest input and output channels: below 64 the transforms outweigh the product (16->32 at 56x56
# ran 0.57x the direct kernel, 64->64 2.0x).
MIN_CHANNELS = 64
# Fewest tiles (over the batch): 14x14 at batch 1 (16 tiles) ran 1.31x the direct kernel, 7x7
# (4 tiles) 0.26x, 7x7 at batch 8 (32) 1.17x.
MIN_TILES = 16
# The unblocked form's transformed input or product (36 x tiles x channels floats, each written
# once and read once from memory) may be this many times the cores' L2 together: 128@112 (14 MB
# against 2 MB of L2) ran 1.48x the direct kernel, 64@224 (29 MB) 0.87x.
MAX_L2_MULTIPLE = 8
# Tile rows a task of the blocked form carries through all three stages (at least: rounded up so
# a block is whole rows and whole register tiles). 64@224: 1 row 1.37x the direct kernel, 2 rows
# 1.50x, 4 rows 1.47x.
BLOCK_ROWS = 2


@functools.lru_cache(maxsize=1)
def matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, G) of F(4x4, 3x3), float32: TVM's Cook-Toom construction (the points TOPI uses)."""
    points = winograd_util._interpolation_points(TILE + 3 - 2)
    return tuple(m.astype(np.float32) for m in winograd_util._cook_toom_convolution(points, TILE, 3))


@dataclass(frozen=True)
class WinogradSpec(NCHWShapes):
    """The shape facts a compiled Winograd kernel is specialised on, and its register tile."""
    geo: ConvGeometry
    has_bias: bool
    activation: str | None
    lanes: int
    pixel_tile: int  # tiles per register tile of the product
    k_vectors: int  # output-channel vectors per register tile
    # Tiles per task of the blocked form (``blocked``): each task transforms its block's input,
    # multiplies it by every transformed weight and transforms its products, so the block's
    # tensors stay in cache; None: each stage over all tiles, one after the other.
    block_tiles: int | None = None
    residual: bool = False  # a tensor of the output's shape added before the activation
    kind: str = "winograd_conv2d"

    @property
    def tile_grid(self) -> tuple[int, int]:
        return tile_grid(self.geo)

    @property
    def tiles(self) -> int:
        return _tiles(self.geo)

    @property
    def padded_tiles(self) -> int:
        """Tiles the product computes: whole register tiles (whole blocks in the blocked form)."""
        step = self.block_tiles or self.pixel_tile
        return -(-self.tiles // step) * step

    @property
    def transformed_tiles(self) -> int:
        """Tiles the input transform computes: whole rows of tiles (its tasks), at least ``padded_tiles``."""
        tw = self.tile_grid[1]
        return -(-self.padded_tiles // tw) * tw

    @property
    def padded_channels(self) -> int:
        block = self.k_vectors * self.lanes
        return -(-self.geo.out_channels // block) * block

    @property
    def u_shape(self):
        return (ALPHA, ALPHA, self.geo.in_channels, self.padded_channels)


def _computes(geo: ConvGeometry) -> bool:
    """Whether the kernel computes this conv at all: 3x3, stride 1, dilation 1, padding 1."""
    return (geo.kh, geo.kw, geo.stride, geo.dilation, geo.pad) == (3, 3, (1, 1), (1, 1), (1, 1, 1, 1))


def tile_grid(geo: ConvGeometry) -> tuple[int, int]:
    """Rows and columns of tiles over one image's output."""
    return -(-geo.out_height // TILE), -(-geo.out_width // TILE)


def _tiles(geo: ConvGeometry) -> int:
    th, tw = tile_grid(geo)
    return geo.batch * th * tw


def blocked(geo: ConvGeometry) -> bool:
    """Whether the kernel runs in blocks of tile rows (``WinogradSpec.block_tiles``): where the
    transformed weights read once per block cost less traffic than the transformed input and
    products written and read once between the stages. Measured, blocked against one stage after
    the other: 64@224 13.0 against 19.5 ms (the direct kernel's: the unblocked form does not apply),
    128@112 9.9 / 10.6, 128@28 0.60 / 0.69; 256@56 7.9 / 6.8, 512@28 17.3 / 8.4, 256@14 1.17 /
    1.03 (their weights, 9-38 MB transformed, read again by every block)."""
    blocks = -(-geo.batch * tile_grid(geo)[0] // BLOCK_ROWS)
    weights = ALPHA * ALPHA * geo.in_channels * geo.out_channels
    return weights * blocks < ALPHA * ALPHA * _tiles(geo) * (geo.in_channels + geo.out_channels)


def applies(geo: ConvGeometry, cache: Caches) -> bool:
    """Whether a dense conv runs this kernel: 3x3, stride 1, no dilation, padding 1, a static
    batch, at least MIN_CHANNELS channels in and out and MIN_TILES tiles, and, unless it runs
    blocked, transformed tensors within MAX_L2_MULTIPLE x the cores' L2."""
    if not isinstance(geo.batch, int) or not _computes(geo) or min(geo.in_channels, geo.out_channels) < MIN_CHANNELS \
            or _tiles(geo) < MIN_TILES:
        return False
    biggest = ALPHA * ALPHA * _tiles(geo) * max(geo.in_channels, geo.out_channels) * 4
    return blocked(geo) or biggest <= MAX_L2_MULTIPLE * cache.l2 * cache.cores


def make_spec(x_shape, weight_shape, has_bias, activation, target, stride=1, padding=0, dilation=1) -> WinogradSpec:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: {activation!r} is not supported; use one of {ACTIVATIONS}")
    geo = ConvGeometry.create(x_shape, weight_shape, stride, padding, dilation)
    if not _computes(geo):
        raise ValueError("the Winograd kernel computes 3x3 convs of stride 1, dilation 1 and padding 1 only")
    lanes, k_vectors = vector_lanes(target), 2
    pixel_tile = _pixel_tile(_tiles(geo), max(1, (vector_registers(target) - k_vectors - 2) // k_vectors))
    block_tiles = None
    if blocked(geo):  # whole rows of tiles and whole register tiles, at least BLOCK_ROWS rows
        tw = tile_grid(geo)[1]
        unit = tw * pixel_tile // math.gcd(tw, pixel_tile)
        block_tiles = -(-BLOCK_ROWS * tw // unit) * unit
    return WinogradSpec(geo, has_bias, activation, lanes, pixel_tile, k_vectors, block_tiles)


def _pixel_tile(tiles: int, most: int) -> int:
    """Tiles per register tile: at most ``most`` (the accumulators take the registers left after
    the weight vectors and one broadcast), at least half of it, the one that pads the tiles least,
    then the widest. 14x14 at batch 1 (16 tiles): 8 ran 1.34x 14 (which computed 28); 28x28 (49):
    7 1.08x 14 (56)."""
    return min(range(-(-most // 2), most + 1), key=lambda t: (-(-tiles // t) * t, -t))


def winograd_inputs(weight, x_shape, bias, activation, target, **conv_args):
    """The kernel's spec and its constant arrays (transformed weight, padded bias) for one layer."""
    spec = make_spec(tuple(x_shape), weight.shape, bias is not None, activation, target, **conv_args)
    _, _, g = matrices()
    u = np.einsum("ar,kcrs,bs->abck", g, np.asarray(weight, np.float32), g, optimize=True)
    pad = spec.padded_channels - spec.geo.out_channels
    arrays = [np.ascontiguousarray(np.pad(u, ((0, 0), (0, 0), (0, 0), (0, pad))), np.float32)]
    if bias is not None:
        arrays.append(np.pad(np.asarray(bias, np.float32).reshape(-1), (0, pad)))
    return spec, arrays


def applies_to(x_shape, weight_shape, target, **conv_args) -> bool:
    """``applies`` for a layer given as its shapes and conv arguments."""
    try:
        geo = ConvGeometry.create(tuple(x_shape), tuple(weight_shape), conv_args.get("stride", 1),
                                  conv_args.get("padding", 0), conv_args.get("dilation", 1))
    except ValueError:
        return False
    return applies(geo, caches(target))


# ----------------------------------------------------------------------------- compute

def winograd_compute(spec: WinogradSpec) -> list[te.Tensor]:
    """TE tensors (x, U[, bias][, residual], out) of the whole layer."""
    g = spec.geo
    n_b, c_in = g.batch, g.in_channels
    th, tw = spec.tile_grid
    padded, transformed, kp = spec.padded_tiles, spec.transformed_tiles, spec.padded_channels
    a_np, b_np, _ = matrices()
    a_m, b_m = topi_utils.const_matrix(a_np, "A"), topi_utils.const_matrix(b_np, "B")
    x = te.placeholder(spec.x_shape, "float32", name="x_nchw")
    u = te.placeholder(spec.u_shape, "float32", name="w_winograd")
    bias = te.placeholder((kp,), "float32", name="bias") if spec.has_bias else None
    residual = te.placeholder(spec.out_shape, "float32", name="residual") if spec.residual else None
    zero = tvm.tirx.const(0.0, "float32")
    # Rows and columns of whole tiles and their 1-pixel border; tiles past the last image read
    # the last image's (their products are never stored).
    x_pad = te.compute((n_b, c_in, th * TILE + 2, tw * TILE + 2), lambda n, c, r, q: te.if_then_else(
        tvm.tirx.all(r >= 1, r <= g.height, q >= 1, q <= g.width), x[n, c, r - 1, q - 1], zero), name="x_pad")

    def window(c, p, i, j):
        row_of_tiles = p // tw
        n = tvm.tirx.min(row_of_tiles // th, n_b - 1)
        return x_pad[n, c, row_of_tiles % th * TILE + i, p % tw * TILE + j]

    ra, rb = te.reduce_axis((0, ALPHA), "ra"), te.reduce_axis((0, ALPHA), "rb")
    rows = te.compute((ALPHA, ALPHA, c_in, transformed), lambda e1, j, c, p: te.sum(
        window(c, p, ra, j) * b_m[ra, e1], axis=ra), name="rows")
    v = te.compute((ALPHA, ALPHA, c_in, transformed), lambda e1, e2, c, p: te.sum(
        rows[e1, rb, c, p] * b_m[rb, e2], axis=rb), name="V")
    rc = te.reduce_axis((0, c_in), "rc")
    m = te.compute((ALPHA, ALPHA, padded, kp), lambda e1, e2, p, k: te.sum(
        v[e1, e2, rc, p] * u[e1, e2, rc, k], axis=rc), name="M")
    r1, r2 = te.reduce_axis((0, ALPHA), "r1"), te.reduce_axis((0, ALPHA), "r2")
    # (by image, row and column of tiles, so the epilogue's reads of a row of tiles index one
    # variable per dimension and the epilogue can run where its row of tiles is computed)
    y = te.compute((n_b, th, tw, TILE, TILE, kp), lambda n, r, q, i, j, k: te.sum(
        m[r1, r2, (n * th + r) * tw + q, k] * a_m[r1, i] * a_m[r2, j], axis=[r1, r2]), name="Y")

    def value(n, k, h, w):
        out = y[n, h // TILE, w // TILE, h % TILE, w % TILE, k]
        out = out + bias[k] if bias is not None else out
        return activate(out + residual[n, k, h, w] if residual is not None else out, spec.activation)

    out = te.compute(spec.out_shape, value, name="out")
    return [x, u] + [t for t in (bias, residual) if t is not None] + [out]


def prim_func(spec: WinogradSpec) -> tvm.tirx.PrimFunc:
    return te.create_prim_func(winograd_compute(spec))


# ----------------------------------------------------------------------------- schedule

def schedule_winograd(func: tvm.tirx.PrimFunc, spec: WinogradSpec, decide=FixedDecisions(),
                      seed: int | None = None) -> tvm.s_tir.Schedule:
    """The input padded in a parallel pass of its own; then either the input transform and the
    product each a parallel loop of their own and the output transform one over rows of tiles,
    or (``block_tiles``) one parallel loop over blocks of tile rows, each running the three
    stages on its block; the epilogue to NCHW in the output transform's tasks. ``decide`` is
    unused (no knob is tuned yet: the tuner's one candidate is this schedule)."""
    sch = tvm.s_tir.Schedule(func, seed=seed)
    for name in ("A", "B"):
        sch.compute_inline(sch.get_sblock(name))
    n, c, r, _ = sch.get_loops(sch.get_sblock("x_pad"))
    sch.parallel(sch.fuse(n, c, r))
    y = sch.get_sblock("Y")
    n, r, p, i, j, k, r1, r2 = sch.get_loops(y)
    k_o, k_l = sch.split(k, [None, spec.lanes])
    if spec.block_tiles:  # (blocks of rows within an image, each image's last one cut short)
        r, rows = sch.split(r, [None, spec.block_tiles // spec.tile_grid[1]])
        p = sch.fuse(rows, p)
    task = sch.fuse(n, r)  # (a row of tiles, or a block of rows)
    sch.reorder(task, p, k_o, r1, r2, i, j, k_l)
    sch.parallel(task)
    sch.reverse_compute_at(sch.get_sblock("out"), task, preserve_unit_loops=True)
    if spec.block_tiles:
        for name in ("M", "V", "rows"):  # (consumers first: each is placed where its consumer reads it)
            sch.compute_at(sch.get_sblock(name), task, preserve_unit_loops=True)
    _schedule_transform(sch, spec, task if spec.block_tiles else None)
    _schedule_product(sch, spec, task if spec.block_tiles else None)
    for loop in (r1, r2, i, j):
        sch.unroll(loop)
    sch.vectorize(k_l)
    init = sch.decompose_reduction(y, r1)
    *_, i_i, i_j, i_l = sch.get_loops(init)
    sch.unroll(i_i)
    sch.unroll(i_j)
    sch.vectorize(i_l)
    _schedule_epilogue(sch, spec)
    return sch


# Fewest output pixels a vector of the epilogue's stores holds; below, scalar stores. Measured
# on a Zen 4 (b1, one process), transposed against scalar stores, the epilogue a pass of its own
# with vectors along a row: 16 pixels 1.38-1.39x (64@224, 128@112, 64->128@112), 8 pixels
# 1.02-1.13x (64@56, 256@56), 4 pixels 0.75-1.12x (128@28, 512@28), 2 pixels 1.02x (256@14).
# Run in the output transform's tasks (a row of tiles: 4 rows, one run of pixels) against a pass
# of its own: 64@56 1.05x, 256@56 1.08x, 128@28 1.01x / 0.99x (b1 / b8), 256@14 1.09x / 1.09x,
# blocked 64@224 1.20x.
MIN_STORE_WIDTH = 8


def store_width(pixels: int, lanes: int) -> int:
    """Output pixels per vector of the epilogue's stores: the most (a power of two, at most the
    lanes) that divide the ``pixels`` of a task's rows in one plane, or 1 (scalar stores) where
    that is under MIN_STORE_WIDTH."""
    width = max(w for w in (1, 2, 4, 8, 16, 32, 64) if w <= lanes and pixels % w == 0)
    return width if width >= MIN_STORE_WIDTH else 1


def _schedule_epilogue(sch, spec):
    """In each task of the output transform, on the rows of tiles it has just transformed (their
    products still in cache, on the core that made them): per vector of channels and vector of
    pixels (a task's output rows are one run of pixels in each NCHW plane, so a vector may span
    rows), the products' channel vectors transposed in registers (``transposed``); scalar where
    the rows do not divide into vectors of ``MIN_STORE_WIDTH`` pixels or more."""
    *_, k, h, w = sch.get_loops(sch.get_sblock("out"))
    width = store_width(int(sch.get(h).extent) * spec.geo.out_width, spec.lanes)
    if width == 1:
        return
    k_o, k_l = sch.split(k, [None, spec.lanes])
    q_o, q_l = sch.split(sch.fuse(h, w), [None, width])
    sch.reorder(k_o, q_o, k_l, q_l)
    sch.vectorize(q_l)
    sch.annotate(k_l, TRANSPOSE_ATTR, "Y")


def _schedule_transform(sch, spec, task):
    """Per (input channel, row of tiles): rows then columns, the row's tiles in the lanes; a
    parallel loop over them, or serial inside the block's ``task``."""
    v = sch.get_sblock("V")
    *_, e1, e2, c, p, rb = sch.get_loops(v)
    row_of_tiles, tile = sch.split(p, [None, spec.tile_grid[1]])
    sch.reorder(c, row_of_tiles, e1, e2, rb, tile)
    at = row_of_tiles
    if task is None:
        at = sch.fuse(c, row_of_tiles)
        sch.parallel(at)
    stored = sch.cache_write(v, 0, "local")
    sch.reverse_compute_at(stored, at, preserve_unit_loops=True)
    rows = sch.get_sblock("rows")
    sch.compute_at(rows, at, preserve_unit_loops=True)
    sch.set_scope(rows, 0, "local")
    r_e1, r_j, r_c, r_p, r_a = sch.get_loops(rows)[-5:]  # (r_c: the one channel)
    sch.reorder(r_e1, r_j, r_c, r_a, r_p)
    depth = len(sch.get_loops(stored)) - 4  # the loops down to ``at``
    for block in (rows, v, stored):
        *unrolled, lanes = sch.get_loops(block)[depth:]
        for loop in unrolled:
            sch.unroll(loop)
        sch.vectorize(lanes)


def _schedule_product(sch, spec, task):
    m = sch.get_sblock("M")
    *_, e1, e2, p, k, rc = sch.get_loops(m)
    p_o, p_i = sch.split(p, [None, spec.pixel_tile])
    k_o, k_v, k_l = sch.split(k, [None, spec.k_vectors, spec.lanes])
    sch.reorder(e1, e2, k_o, p_o, rc, p_i, k_v, k_l)
    if task is None:
        sch.parallel(sch.fuse(e1, e2, k_o))
    stored = sch.cache_write(m, 0, "local")
    sch.reverse_compute_at(stored, p_o, preserve_unit_loops=True)
    sch.unroll(p_i)
    sch.unroll(k_v)
    sch.vectorize(k_l)
    init = sch.decompose_reduction(m, rc)
    *_, i_p, i_v, i_l = sch.get_loops(init)
    sch.unroll(i_p)
    sch.unroll(i_v)
    sch.vectorize(i_l)
    *_, s_p, s_k = sch.get_loops(stored)
    s_v, s_l = sch.split(s_k, [None, spec.lanes])
    sch.unroll(s_p)
    sch.unroll(s_v)
    sch.vectorize(s_l)


def default_schedule(func: tvm.tirx.PrimFunc, spec: WinogradSpec) -> tvm.s_tir.Schedule:
    return schedule_winograd(func, spec)
