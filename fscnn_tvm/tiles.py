"""The sparse kernel's policies, read from the CPU description (``target``: SIMD lanes and
registers, L1d/L2 sizes, cores) and a layer's shapes: the vector width of its rows, whether a
pointwise conv runs on its flattened image, the default register tile, the band height of a
banded layout, the chunk size of a chunked reduction, and whether a conv reads interleaved
rows. Measurements behind each rule are in its docstring; docs/performance.md has the rest."""
from __future__ import annotations

import dataclasses
import math
import mmap
from typing import TYPE_CHECKING

from .geometry import ConvGeometry, InputLayout
from .target import Caches

if TYPE_CHECKING:
    from .ops import KernelSpec


def choose_lanes(out_width: int, native: int, half_cost: float = 1.0) -> int:
    """Vector width for the output rows: native or half, whichever costs the row least, a
    half-width vector costing ``half_cost`` times its FLOPs at native width
    (``cpuprobe.half_width_cost``): where both widths run the same FLOPs a cycle (Zen 4), the
    width that pads the row least; where half-width ops are slower (Xeons with two 512-bit FMA
    units), native unless half pads that much less. Never below 8 lanes while the
    native width is 8 or more: a 128-bit op costs what a 256-bit one does on every AVX2 and
    AVX-512 CPU, so 4-lane rows do the same work in more ops (measured at 90 % on AVX2, 28-wide
    rows, where 4 lanes pad nothing: 8 lanes 1.02-1.20x on 3x3 layers, 1.44x on a 1x1 conv,
    which then runs flattened). Measured on a Sapphire Rapids class Xeon, 56-wide rows (8 lanes
    pad nothing, 16 pad 8 columns), 16 lanes against 8: 64@56 1.05-1.30x, 128->256@56
    1.07-1.35x, 256@56 1.22-1.25x at 70 and 90 %; 7-wide rows (16 lanes pad 9 columns) 0.63x.
    Pointwise convs read in place with masked row ends (``ops.make_spec``) keep the padding
    rule: at 16 lanes 49 pixels ran 1.11-1.21x but 196 0.95x, and ResNet-50's 1024->256@14
    0.52x in the peer benchmark."""
    options = [v for v in (native, native // 2) if v >= min(native, 8)]
    return min(options, key=lambda v: (-(-out_width // v) * v * (half_cost if v < native else 1.0), -v))


def flattens(row: KernelSpec, flat: KernelSpec) -> bool:
    """Whether a pointwise conv (1x1, stride 1, no padding) runs on its image flattened to one
    row (``flat``) instead of per row (``row``): where its H*W pixels pad to fewer whole vectors
    than its H rows do and split into a register tile of 4 to 8 vectors, or pad as much and
    fill a bigger register tile. Measured at 90 %: 1.19-1.90x the per-row kernel at 28x28
    (AVX-512); at 7x7 (AVX2: a row is one vector and 7 rows do not split, so the per-row tile is
    4 channels x 1 vector, flattened 1 x 7 vectors) 1.59-1.83x; at 56x56, where 8-lane rows pad
    nothing and the per-row tile holds 16 accumulators, 0.69-0.82x."""
    def padded(spec):
        return spec.geo.out_height * spec.padded_width
    if padded(flat) != padded(row):
        n_vectors = flat.padded_width // flat.lanes
        return padded(flat) < padded(row) and any(n_vectors % v == 0 for v in range(4, 9))
    return math.prod(default_tile(flat)) > math.prod(default_tile(row))


def band_rows_for(layout: InputLayout, cache: Caches, images: int = 1) -> int | None:
    """Output rows per band of the banded layout (``KernelSpec.band_rows``), or None.
    The input is laid out band by band when the whole layout would not fit the cores' L2
    caches together (the pass would write it to memory and the tiles re-read it from there);
    a band is at most half of one core's L2, and there are at least 4 bands to share between
    threads. Measured at 90 %, default schedules, on a Zen 4 (1 MiB L2 per core, 2 cores)
    against the whole-image layout: VGG16 64->64 at 224 CSR 1.20-1.27x, 8x1 BSR 1.07x;
    128->128 at 112 BSR 1.47x, CSR 1.04x; 256->256 at 56 1.0-1.1x; ResNet-50's 256->64 1x1 at
    56 3.2-4.3x. With ``images`` (a batch laid out in one pass, each core then reading its own
    images' layouts) also where those exceed half of each core's L2, in bands whose halo rows
    are at most a quarter of their own: ResNet-18's 64->128 3x3 stride 2 at 56 (928 KiB an
    image; bands of 7 output rows, 8 rows of each stride phase) at batch 2-4, 1.29-1.32x an
    image, 128->128 stride 2 at 56 1.34-1.39x; bands of 1-2 rows on 14x14 maps ran 0.57-0.94x
    (``ops.kernel_inputs`` asks only for spatial kernels that do not chunk their reduction:
    chunked ones ran 0.50-0.66x banded)."""
    geo = layout.geo
    size = dataclasses.replace(layout, band_rows=None).size * 4
    if images > 1:  # each core's images (the parallel loop splits the batch first)
        fits_l2 = size * -(-images // cache.cores) <= cache.l2 // 2
    else:
        fits_l2 = size <= cache.l2 * cache.cores
    if fits_l2:
        return None
    fits = [r for r in range(1, geo.out_height // 4 + 1)
            if geo.out_height % r == 0 and dataclasses.replace(layout, band_rows=r).size * 4 <= cache.l2 // 2]
    if images > 1:  # a batch's bands only where their halo rows (laid out twice) are few
        fits = [r for r in fits if 4 * (geo.band_height(r) - r) <= r]
    return max(fits, default=None)


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


# Independent accumulator chains a tile keeps in flight (a linear layer's ``default_tile``, the
# least a chunked conv's ``chunk_tile`` is cut to): an FMA's latency (4 cycles) times the FMAs a
# cycle (2) on the CPUs we measured.
FMA_CHAINS = 8


def linear_group(ell_shape) -> int:
    """Rows of a CSR linear table stored interleaved, slot by slot (``formats.interleave_rows``,
    read through ``lowering.interleaved_table``): as many as the default tile runs
    (``default_tile``), so a tile reads its weights and its offsets as one stream each instead of
    one per row. Only where a row's values span less than a page: the hardware prefetchers follow
    a stream within a page, so short rows restart them row after row (cold weights 1.3-1.5x
    faster interleaved), while long rows stream well as they are (0.93-0.97x interleaved). Images
    in the lanes (a tile of one row) keep the rows as they are."""
    n_kb, width, bo, bi = ell_shape
    if (bo, bi) != (1, 1) or width * 4 >= mmap.PAGESIZE:
        return 1
    return _largest_divisor(n_kb, FMA_CHAINS)


def default_tile(spec: KernelSpec) -> tuple[int, int, int]:
    """(table channel blocks, output rows, vectors of output pixels) of the default register tile."""
    n_kb, _, bo, _ = spec.ell_shape
    if spec.kind != "conv2d":
        if spec.batch_in_lanes:
            return 1, 1, 1
        # Rows of the table a tile, each its own chain of FMAs: a row's nonzeros add into one
        # accumulator, each add waiting on the last, so one row a tile runs at the FMA's latency,
        # not the loads' rate. As many rows as ``FMA_CHAINS``, within the registers. Measured
        # alone at 90 % on a Zen 4, 1 / 4 / 8 rows: CSR 25088->4096 6.26 / 3.88 / 3.08 ms,
        # 4096->4096 0.90 / 0.41 / 0.43, 2048->1000 0.088 / 0.041 / 0.043; BSR 8x1 25088->4096
        # 1.61 / 1.05 / 1.02, 4096->4096 0.127 / 0.077 / 0.075. (Images in the lanes keep one row:
        # there 2 and 4 rows ran 8x slower, 8 rows 1.18x faster, not understood.)
        return _largest_divisor(n_kb, min(FMA_CHAINS, max(1, (spec.registers - 4) // -(-bo // spec.lanes)))), 1, 1
    n_vectors = spec.padded_width // spec.lanes
    if bo > 1:
        # BSR: one block row (bo channels) by up to 8 // bo vectors. Measured on VGG16 layers
        # with 8x1 blocks at 90 %: filling more accumulators (2 rows or 2 vectors) was 0.66-1.21x.
        return 1, 1, _largest_divisor(n_vectors, max(1, 8 // bo))
    # CSR: up to 4 channels x whole vectors along a row, up to one cache line (then each
    # nonzero's window loads whole lines, and a tile spans fewer rows of the input, which
    # matters where the input band lives in L2), x as many rows as the registers hold (at
    # most 7): each channel's weight broadcast and offset load then serve more FMAs.
    # Measured at 90 %: with AVX-512 (32 registers, a line is one vector) 4 x 7 rows beat 4
    # x <=4 by 0.95-1.10x on maps of 28-224 rows and 1.23-2.2x on 7 and 14 rows; with AVX2
    # (16, a line is two vectors) 4 x 2 rows x 2 vectors beat 4 x 4 x 1 by 1.1-1.3x on
    # 28-112-wide maps (e.g. 512->512 at 28, 256->512 at 28, stride-2 layers), where 56-wide
    # rows (7 vectors) keep 4 x 4 x 1. Where 4 channels leave no room for a second row
    # (7-row maps on AVX2), 2 channels x 7 rows beat 4 x 1 row: 2.0x on 512->512 at 7x7,
    # 1.7-1.8x on 7x7 pointwise convs (1.1x over their flattened 1 x 7 vectors). A one-row
    # image (a flattened pointwise conv) spans vectors instead: as many as the registers
    # hold besides a broadcast, a load and two spares, then channels up to 4 in what is left
    # (a channel's offset load and broadcast serve one FMA per vector, so vectors, not
    # channels, cut the loads per FMA). Measured on AVX2 at 90 %: 1024->256 at 14x14 (25
    # vectors) 2 channels x 5 vectors 1.37-1.47x over 4 x 1; 512->128 at 28x28 1 x 7
    # 1.03-1.08x over 4 x 2.
    if spec.interleaved:
        # One channel x rows x a row's vectors (or as many as fit): its epilogue permutes the
        # row's columns in registers. Measured on 64->128 at 112x112, 90 %: 2 rows x 7 vectors
        # 1.5x over 4 rows (28 accumulators and the permutes' temporaries spill).
        vectors = _largest_divisor(n_vectors, spec.registers - 4)
        rows = _largest_divisor(spec.band_rows or spec.geo.out_height, max(1, (spec.registers - 4) // (2 * vectors)))
        return 1, rows, vectors
    vectors = _largest_divisor(n_vectors, spec.line_vectors)
    for channels in sorted({_largest_divisor(n_kb, c) for c in (4, 2)}, reverse=True):
        rows = _largest_divisor(spec.band_rows or spec.geo.out_height, min(7, spec.registers // (channels * vectors)))
        if rows > 1:
            return channels, rows, vectors
    vectors = _largest_divisor(n_vectors, spec.registers - 4)
    return _largest_divisor(n_kb, min(4, (spec.registers - 4) // vectors)), 1, vectors


def chunk_tile(spec: KernelSpec) -> tuple[int, int]:
    """(output rows, vectors of output pixels) of a chunked kernel's register tile, one table
    row wide (each row runs exactly its own slots of a chunk, so a tile of one row has no
    padding to skip; a slot's offset load and broadcasts serve rows x vectors FMAs per channel):
    the most vectors of a row that divide it, then the most rows that divide the map, within the
    registers but two (a broadcast and a spare). A row of one channel reads each window straight
    into its FMA; a row of several channels (``MASK_CHANNELS``) holds each window in a register
    for its channels' FMAs, beside one accumulator per channel. A tile spans at most a quarter
    of the map's rows where that still leaves ``FMA_CHAINS`` accumulators (the FMA chains that
    hide an FMA's latency): on 28-wide maps with AVX-512 (2 vectors of 16 lanes) 14-row tiles
    left half the map to a task, and 7-row ones ran 1.04-1.21x
    (Zen 4, 128->128 and 256->512 3x3 at 70 and 90 %, batch 1 and 8; more tasks from splitting
    the channels instead gained 1.05-1.07x). Below that the tile is too small: 14-wide maps with
    AVX2 (2 vectors of 8) at 2 rows instead of 7 ran 0.65-0.70x, and with one vector a row
    (AVX-512) at 7 rows instead of 14 0.94-1.09x."""
    room = spec.registers - 2
    bo = spec.ell_shape[2]
    per_vector = 1 if bo == 1 else bo + 1
    vectors = _largest_divisor(spec.padded_width // spec.lanes, max(1, room // per_vector))
    span = spec.band_rows or spec.geo.out_height
    rows = _largest_divisor(span, max(1, room // per_vector // vectors))
    quarter = _largest_divisor(span, max(1, min(rows, span // 4)))
    if not spec.band_rows and quarter * vectors >= FMA_CHAINS:  # (a band is a task's rows already)
        rows = quarter
    return rows, vectors


def chunk_task_vectors(spec: KernelSpec) -> int:
    """Vectors of output pixels a chunked kernel's task spans: its rows whole, or on a one-row
    image (a flattened pointwise conv) one tile, so a chunk's window stays small."""
    return chunk_tile(spec)[1] if spec.geo.out_height == 1 else spec.padded_width // spec.lanes


def chunk_task_channels(spec: KernelSpec) -> int:
    """Table channels per task of a chunked kernel: every one where the input is laid out band
    by band (a task is one band); otherwise the most (a divisor of a part's rows, so no task
    spans two parts of a split table) that still leaves one task per core (of a spatial conv; 4
    of a pointwise one) with the tile's bands of rows, so each chunk's input window, once in
    L1, serves as many channels as it can. Measured on a Xeon (Sapphire Rapids class, 48 KiB
    L1d, 2 MiB L2) at 90 %, 1 task per core against 4: 512->512 3x3 at 28x28 1.08-1.13x,
    256->512 1.05x, other VGG16 3x3 layers at 70/90 % 0.97-1.04x; 16 tasks per core 0.77x, 64
    0.49x. Pointwise convs (their chunk's window no wider than the tile): 1 per core ran
    ResNet-50's 1024->256 at 14x14 0.79-0.84x, 512->128 at 28x28 0.92-1.16x, others 0.96-1.10x."""
    n_kb = spec.ell_shape[0]
    if spec.band_rows:
        return n_kb
    rows, task_vectors = chunk_tile(spec)[0], chunk_task_vectors(spec)
    bands = spec.geo.out_height // rows * spec.padded_width // spec.lanes // task_vectors * max(spec.batch, 1)
    part = n_kb // spec.parts  # a task's channels within one part
    tasks_per_core = 1 if spec.geo.kh * spec.geo.kw > 1 else 4
    return max((d for d in range(1, part + 1)
                if part % d == 0 and bands * (n_kb // d) >= tasks_per_core * spec.cores), default=1)


# Fewest nonzeros a row should hold on one chunk: each (row, chunk) costs a loop's setup and a
# load and store of the tile's accumulators.
CHUNK_NONZEROS = 4


# Most channels a chunked kernel's table row may hold: its slots are run by mask (which of the
# row's channels have a nonzero weight there), one loop per mask, 2**channels - 1 loops.
MASK_CHANNELS = 4
# Fewest FMAs per window load (``formats.column_sharing``) for which a CSR conv of more than
# one kernel column is rebuilt with several channels per row (``shared_channels``).
SHARED_FMAS = 1.15


def chunkable(spec: KernelSpec) -> bool:
    """Whether a kernel of ``spec`` can run its reduction in chunks: a conv of one input column
    per slot and at most ``MASK_CHANNELS`` channels per table row."""
    return spec.kind == "conv2d" and spec.ell_shape[3] == 1 and spec.ell_shape[2] <= MASK_CHANNELS


def chunking(spec: KernelSpec, mean_row: float) -> int | None:
    """Input channels per chunk of a CSR conv's reduction, or None (one pass). Without chunks
    each nonzero's input window comes from wherever its channel lies, mostly L2 on maps of 14
    rows and up; measured on AVX2 (Zen 3) a loop of such loads runs ~2.5x slower from L2 than
    from L1. A task of the chunked kernel (a band of the tile's rows, or one tile of a one-row
    image, x a group of channels; or one band of a banded layout x every channel, a band of
    the tile's rows at a time) runs every channel on one chunk of input channels, whose window
    for the tile's rows fits the L1d, before the next (the largest such chunk: on AVX2 at 90 %,
    chunks filling 15 and 30 KiB of a 32 KiB L1d ran 1.40x and 1.51x on 64->64 3x3 at 56x56,
    1.26x and 1.37x on 256->64 1x1 at 56x56; on a banded layout, chunks sized to the tile's
    rows instead of the whole band, e.g. 16 channels instead of 2 on 64->64 at 224x224, ran
    1.10-1.21x on VGG16's 64- and 128-channel layers at 70 % and 90 % on a Sapphire Rapids
    class Xeon, 48 KiB L1d; a chunk of half or twice the L1d 0.92x). Only
    where the laid-out input exceeds a quarter of the L2: measured at 70-90 % on AVX2 (512 KiB
    L2), 3x3 convs on 14-56 rows (262-950 KiB of input) 1.2-1.7x,
    2048->512 1x1 at 7x7 (458 KiB) 1.23x, 3x3 convs at 7x7 (147-295 KiB) 0.91-1.06x, 512->2048
    1x1 at 7x7 (115 KiB) 0.97x. And with ``CHUNK_NONZEROS`` per row and chunk on average."""
    if not chunkable(spec) or spec.layout.size * 4 <= spec.l2_bytes // 4:
        return None
    layout = spec.layout
    geo = spec.geo
    rows, vectors = chunk_tile(spec)[0], chunk_task_vectors(spec)
    cols = layout.width if vectors * spec.lanes == spec.padded_width else \
        vectors * spec.lanes + (geo.kw - 1) * geo.dilation[1]
    channel_bytes = geo.phases * geo.band_height(rows) * cols * 4
    fits = [d for d in range(1, geo.in_channels // 2 + 1) if geo.in_channels // spec.parts % d == 0
            and d * channel_bytes <= spec.l1_bytes and mean_row * d / geo.in_channels >= CHUNK_NONZEROS]
    return max(fits, default=None)


def with_pool(spec: KernelSpec, window: int, stride: int, padding: int):
    """``spec`` with a max pool after its epilogue (``KernelSpec.pool``), or None where the kernel
    cannot run it in the tasks that write the pool's rows: a pool whose windows tile the map (window
    = stride, no padding; VGG's), after a chunked kernel whose tasks' rows (a band, or a tile's
    rows) divide by the stride, without a residual."""
    rows = spec.band_rows or (chunk_tile(spec)[0] if spec.chunk_channels else 0)
    if not (spec.kind == "conv2d" and spec.chunk_channels and not spec.residual and not spec.flat_hw
            and window == stride >= 2 and padding == 0 and rows % stride == 0
            and spec.geo.out_height % stride == 0 and spec.geo.out_width >= stride):
        return None
    return dataclasses.replace(spec, pool=stride)


def shared_channels(spec: KernelSpec, sharing) -> int:
    """Channels per table row for a CSR conv (used where that table's kernel runs chunked): 1,
    or 2 for a pointwise conv, or 3 for a conv whose channels share input columns often enough
    (``sharing(3)``: nonzeros per distinct column of a group of 3, at least ``SHARED_FMAS``) that
    one window load serving all of them pays for running each mask of them in its own loop.
    Measured on Zen 4 (AVX-512, 2 threads) against one channel per row, random patterns:
    - 3x3 convs, 3 channels (2 of 3 windows straddle a cache line, so each load saved is a
      split one): 70 % (1.37 FMAs a load) 1.06-1.16x on maps of 14-112 rows; 80 % (1.23)
      0.99-1.13x; 90 % (1.11) 0.97-1.0x. 2 channels: 0.99-1.13x at 70 %.
    - pointwise convs (aligned windows), 2 channels: 70 % 1.06-1.16x; 80 % 1.06-1.16x; 90 % 1.01-1.60x
      (the most on few nonzeros per row: 64->256@56 1.60x, 24->144@56 1.22x, where one channel per
      row did not chunk), MobileNetV2's and ResNet-50's shapes 0.98-1.6x; 3 channels 0.67-1.22x.
    - a CPU of 16 vector registers (AVX2, ``znver3`` target on the same CPU): 0.31-1.15x, the
      tile of 2-3 channels leaving room for 3-4 vectors of pixels: one channel per row there.
    - interleaved rows (every window load aligned, so a shared load saves no split one): one
      channel per row against 3 on a Sapphire Rapids class Xeon at 70 %, VGG16's 3x3 layers
      1.13-1.18x (64 at 224, 256 at 56, 256->512 and 512 at 28), 0.98-1.04x (64->128 and 128 at
      112, 128->256 at 56): one channel per row there."""
    if spec.registers < 32:
        return 1
    if spec.geo.kw == 1:
        return 2
    return 3 if not spec.interleaved and sharing(3) >= SHARED_FMAS else 1


def batch_lanes(spec: KernelSpec) -> int:
    """Images per vector of a linear kernel that runs its batch in the lanes
    (``KernelSpec.batch_in_lanes``): the most that divide the batch, within the lanes."""
    return _largest_divisor(spec.batch, spec.lanes)


def folds_batch(spec: KernelSpec) -> bool:
    """Whether the register tile can span images: a conv kernel of a fixed batch above one
    (a banded layout is laid out per image and band, so its tiles stay in one image)."""
    return spec.kind == "conv2d" and spec.batch > 1 and not spec.band_rows


# Nonzeros per output channel from which a conv reads interleaved rows (``interleavable``).
# Measured on Zen 4 (AVX-512), 3x3 convs, interleaved against rows of whole vectors: 173-690
# nonzeros per channel (64-512 channels at 70 %, 256 and 512 at 90 %) 1.10-1.41x but for one
# 0.94x (128->256 at 56x56, 70 %: its layout crossed the band rule's bound); 58-115 (64 and 128
# channels at 80-95 %) 0.84-1.21x: the epilogue's gather costs each output vector the same, the
# aligned loads save per nonzero. With AVX2 (``znver3`` on the same CPU) 1.14-1.33x at 230-690.
# CSR weights only (a BSR tile's blocks of channels x a row's vectors would not fit the registers).
INTERLEAVE_NONZEROS = 160
# Nonzeros per input channel (the reads of each laid-out input value, which the interleaved
# layout writes three times) from which a conv reads interleaved rows whatever its nonzeros per
# output channel, where a vector is a cache line and the interleaved rows are at most half again
# as wide as plain ones: the layout pass costs per input value and per column it adds, the
# aligned loads save per nonzero, so on convs that widen (more output than input channels) the
# output-channel count above under-counts the reads. Measured at 90 % on a Zen 5 (AVX-512,
# 48 KiB L1d), interleaved against plain rows, one process: 64->128 at 112x112 (115 reads) 1.24x, 128->128 at 112 (115) 1.15x,
# 128->256 at 56 (230) 1.12-1.39x, a 3->64 stem at 224 pruned to 70 % (173) 1.62x; 64->64 at 224
# and 56 (58) 0.89x and 0.76x; 128->128 at 28x28 (115; rows of 2 vectors, 4 interleaved) 0.80x.
# The first five on a Sapphire Rapids class Xeon: 1.05-1.33x, 1.07-1.32x, 0.99x; 0.94-0.99x, 0.86x.
# Only where a vector is a cache line (every unaligned window load then splits one): with AVX2
# (``znver3`` on the same Zen 5, 8 lanes) 64->128 at 112 ran 0.92x and 128->128 at 28 0.81x.
INTERLEAVE_READS = 100


def interleaves(spec: KernelSpec, nonzeros: int) -> bool:
    """Whether a CSR conv of ``nonzeros`` is worth reading interleaved rows (where it can:
    ``interleavable``)."""
    geo = spec.geo
    if nonzeros >= INTERLEAVE_NONZEROS * geo.out_channels:
        return True
    return nonzeros >= INTERLEAVE_READS * geo.in_channels and spec.line_vectors == 1 \
        and 2 * geo.reach * spec.lanes <= spec.padded_width  # (the vectors interleaving adds a row)


def interleavable(spec: KernelSpec) -> bool:
    """Whether a conv can read interleaved rows: a kernel wider than one column (windows that
    start unaligned), stride 1 (stride-2 convs ran 0.64-0.70x), output rows of at least two
    cache lines (rows of one vector triple the layout: 0.46-0.80x on 14x14 and 7x7 maps with
    AVX-512; 14x14 maps as two vectors of 8 lanes with AVX2 0.83x) and a layout pass to do it in."""
    geo = spec.geo
    line = spec.line_vectors * spec.lanes
    return geo.reach > 0 and geo.stride == (1, 1) and spec.padded_width >= 2 * line \
        and not spec.in_place and spec.flat_hw is None
