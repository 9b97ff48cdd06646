"""Schedule decisions, fixed (the default schedule) or sampled (meta_schedule's search): every
kernel's schedule function takes one of these, so one function serves both."""

# Loop annotation set by the schedule (a sampled decision when tuning): 1 = stop this
# nonzero loop at the longest row of the tile instead of the table width.
TILE_BOUND = "fscnn_tile_bound"
# Loop annotation: the nonzero loop of an expansion fused into the depthwise kernel, which
# ``lowering.bound_rows`` stops at its channel's row length.
ROW_BOUND = "fscnn_row_bound"
# Function attribute of a sparse kernel that reads a row of this many pixels in place although
# they are not whole vectors (``ops.KernelSpec.masked_row``): ``lowering.lower_sparse`` masks its
# window loads past the row.
MASKED_ROW_ATTR = "fscnn_masked_row"
# Function attribute of a sparse kernel on interleaved rows (``ops.KernelSpec.interleaved``): its
# accumulators hold output column j + i * interleave at position j * lanes + i of the row, and
# ``lowering.lower_sparse`` makes the epilogue read them so.
INTERLEAVE_ATTR = "fscnn_interleave"
# Loop annotation (the name of a buffer holding output channels in its vector lanes): the loop
# over a vector's channels in an epilogue that stores NCHW rows, which ``transposed`` rewrites to
# read that buffer transposed in registers.
TRANSPOSE_ATTR = "fscnn_transpose"


class FixedDecisions:
    """The default schedule's decisions: no sampling, a sensible point of the design space."""

    def tile(self, sch, loop, n, max_innermost, default):
        return default

    def unroll_limit(self, sch, loop):
        return None

    def tile_bound(self, sch, loop):
        sch.annotate(loop, TILE_BOUND, 1)


class SampledDecisions:
    """Decisions sampled by meta_schedule, so the tuner can search and mutate them."""

    def tile(self, sch, loop, n, max_innermost, default):
        return sch.sample_perfect_tile(loop, n=n, max_innermost_factor=max_innermost)

    def unroll_limit(self, sch, loop):
        limit = sch.sample_categorical([0, 16, 64, 512], [0.25, 0.25, 0.25, 0.25])
        sch.annotate(loop, "pragma_auto_unroll_max_step", limit)
        sch.annotate(loop, "pragma_unroll_explicit", 1)
        return limit

    def tile_bound(self, sch, loop):
        sch.annotate(loop, TILE_BOUND, sch.sample_categorical([0, 1], [0.5, 0.5]))
