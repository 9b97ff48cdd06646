"""Layer chains: a conv2d or linear head and the ops folded into it, recognised in one walk over
a Relax dataflow block. After the head, in this order when present: a per-channel bias add,
eval-mode BatchNorm (folded into weight and bias: scaling keeps zeros zero), a residual add (a
tensor of the output's shape, read in the kernel's epilogue) and ReLU/ReLU6, each intermediate used
only by the next step. One small matcher per layer kind, as in TVM's own frontends."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm

from . import chunks
from .emit import fusable_pool, is_depthwise, pointwise, runs_dense_kernel

FUSED_ACTIVATIONS = {"relax.nn.relu": "relu", "relax.clip": "relu6"}  # clip: only clip(x, 0, 6)


def _const(expr):
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _op_name(expr):
    from tvm import relax
    return expr.op.name if isinstance(expr, relax.Call) and hasattr(expr.op, "name") else None


@dataclass
class Chain:
    """A conv/linear layer and the ops folded into it."""
    kind: str
    head: object  # the conv2d / matmul call
    x: object  # its data input
    weight: np.ndarray | None  # OIHW or (out, in); None when not a constant
    bias: np.ndarray | None = None
    activation: str | None = None
    fused: list = field(default_factory=list)
    # A tensor of the output's shape added before the activation (a residual): read in the epilogue.
    residual: object = None
    # A max pool after the rest (its call; ``emit.fusable_pool`` says it is one our kernels may
    # fuse): the dense kernel (``convpool``) or a chunked sparse one (``tiles.with_pool``) pools in
    # its tasks, any other kernel gets the pool after it.
    pool: object = None
    last_var: object = None  # the var the whole chain's result is bound to
    skip: set = field(default_factory=set)  # bindings absorbed into the chain


class _Graph:
    def __init__(self, bindings, outputs):
        from tvm import relax
        self.defs = {b.var: b.value for b in bindings}
        self.uses: dict = {}
        for value in [b.value for b in bindings] + [outputs]:
            relax.analysis.post_order_visit(value, self._count)
        self.users = {}
        for b in bindings:
            for v in chunks.free_vars(b.value):
                self.users.setdefault(v, []).append(b.var)

    def _count(self, node):
        from tvm import relax
        if isinstance(node, relax.Var):
            self.uses[node] = self.uses.get(node, 0) + 1

    def only_user(self, var):
        """The binding var that is ``var``'s single use, if any."""
        users = self.users.get(var, [])
        return users[0] if self.uses.get(var, 0) == 1 and len(users) == 1 else None

    def const_of(self, expr):
        """A constant, seen through a reshape of a constant."""
        value = _const(expr)
        if value is None and expr in self.defs and _op_name(self.defs[expr]) == "relax.reshape":
            value = _const(self.defs[expr].args[0])
        return value


def _match_head(var, value, graph: _Graph) -> Chain | None:
    name = _op_name(value)
    if name == "relax.nn.conv2d":
        return Chain("conv2d", value, value.args[0], _const(value.args[1]), last_var=var)
    if name == "relax.matmul":
        rhs = value.args[1]
        w_t = rhs in graph.defs and _op_name(graph.defs[rhs]) == "relax.permute_dims" \
            and _const(graph.defs[rhs].args[0])
        if w_t is not None and w_t is not False and w_t.ndim == 2 and len(value.args[0].ty.shape) == 2:
            chain = Chain("linear", value, value.args[0], w_t, last_var=var)
            chain.skip.add(rhs) if graph.uses.get(rhs, 0) == 1 else None
            return chain
        if len(getattr(value.args[0].ty, "shape", [])) == 2:
            return Chain("linear", value, value.args[0], None, last_var=var)
    return None


def _per_channel(shape, channels: int, kind: str) -> bool:
    """Whether a constant of ``shape`` added to the layer's output is one value per output channel:
    (K, 1, 1) or (1, K, 1, 1) after a conv, (K,) or (1, K) after a linear. Anything else broadcasts
    along other axes (a (K,) vector added to NCHW runs along the width; an (N, 1) column along the
    batch) and stays an add."""
    shape = tuple(int(d) for d in shape)
    allowed = {(channels, 1, 1), (1, channels, 1, 1)} if kind == "conv2d" else {(channels,), (1, channels)}
    return shape in allowed


def _extend(chain: Chain, graph: _Graph, taken=frozenset()):
    """Absorb bias add, BatchNorm, a residual add and ReLU that follow the head, in that order
    when present. A residual add that ``taken`` holds (another chain's, whose output is the other
    operand) is left to it."""
    out_ch = chain.weight.shape[0]
    while True:
        user = graph.only_user(chain.last_var)
        if user is None:
            return
        value = graph.defs[user]
        name = _op_name(value)
        if name == "relax.add" and chain.activation is None:
            other = value.args[1] if value.args[0].same_as(chain.last_var) else value.args[0]
            b = graph.const_of(other)
            if b is None and chain.residual is None and user not in taken and _residual_fits(other, chain):
                chain.residual = other
                chain.fused.append("add")
                chain.skip.add(chain.last_var)
                chain.last_var = user
                continue
            # The shape as added (after any reshape const_of saw through) decides what it broadcasts along.
            if b is None or not _per_channel(getattr(other.ty, "shape", ()), out_ch, chain.kind):
                return
            chain.bias = (0 if chain.bias is None else chain.bias) + b.reshape(-1).astype(np.float32)
            chain.fused.append("bias")
        elif name == "relax.nn.batch_norm" and chain.kind == "conv2d" and chain.activation is None \
                and int(value.attrs.axis) == 1:
            params = [_const(a) for a in value.args[1:5]]
            getter = graph.only_user(user)
            if any(p is None for p in params) or getter is None or int(getattr(graph.defs[getter], "index", -1)) != 0:
                return
            gamma, beta, mean, var = params
            scale = gamma / np.sqrt(var + float(value.attrs.epsilon))
            chain.weight = chain.weight * scale[:, None, None, None].astype(np.float32)
            chain.bias = ((0 if chain.bias is None else chain.bias) - mean) * scale + beta
            chain.fused.append("bn")
            chain.skip.add(user)
            user = getter
        elif name in FUSED_ACTIVATIONS and chain.activation is None and (name != "relax.clip" or _is_relu6(value)):
            chain.activation = FUSED_ACTIVATIONS[name]
            chain.fused.append(chain.activation)
        elif name == "relax.nn.max_pool2d" and chain.kind == "conv2d" and fusable_pool(value) is not None:
            chain.pool = value
            chain.fused.append("max_pool2d")
            chain.skip.add(chain.last_var)
            chain.last_var = user
            return
        else:
            return
        chain.skip.add(chain.last_var)
        chain.last_var = user


def _residual_fits(other, chain) -> bool:
    """Whether ``other`` can be added in the epilogue of ``chain``'s kernel: a float32 tensor of
    exactly the conv's output shape, for a conv our sparse and dense kernels both run."""
    out = getattr(chain.last_var, "ty", None)
    return runs_dense_kernel(chain) and isinstance(getattr(other, "ty", None), type(out)) \
        and other.ty.dtype == "float32" and hasattr(out, "shape") \
        and [str(d) for d in other.ty.shape] == [str(d) for d in out.shape]


def _is_relu6(clip) -> bool:
    bounds = [getattr(a, "value", None) for a in clip.args[1:3]]  # FloatImm (PrimValue in some versions)
    return [getattr(b, "value", b) for b in bounds] == [0.0, 6.0]


def find_chains(main):
    """(bindings, layer chains by their last var, bindings absorbed into a chain) of ``main``."""
    bindings = [b for blk in main.body.blocks for b in blk.bindings]
    graph = _Graph(bindings, main.body.body)
    chains, absorbed = {}, set()
    for b in bindings:
        if b.var in absorbed:
            continue
        chain = _match_head(b.var, b.value, graph)
        if chain is None:
            continue
        if chain.weight is not None:
            _extend(chain, graph, absorbed | set(chains))
        chains[chain.last_var] = chain
        absorbed |= chain.skip
        absorbed.discard(chain.last_var)
    return bindings, chains, absorbed


def fused_expansions(bindings, chains, lo: int, hi: int, outputs) -> dict:
    """{var of a depthwise chain: the pointwise chain computed inside its kernel}, among
    ``bindings[lo:hi]``: a 1x1 stride-1 unpadded conv our kernels run (constant weight, no
    residual), whose output only a depthwise conv of depth multiplier 1 reads (not ``outputs``,
    the function's result), pruned or not (``depthwise.Expansion``: sparse rows one channel a task, dense
    ones in groups). Measured on MobileNetV2's block shapes (Zen 4, 2 threads; the fused kernel
    against the expansion's kernel (CSR or dense) and the depthwise kernel in turn, caches hot /
    flushed): at 90 % 1.04-2.9x / 1.3-2.0x, at 70 % 0.94-1.22x / 1.12-1.23x, at 50-60 % (groups)
    1.02-1.24x / 1.13-1.29x, dense (groups) 0.98-1.83x / 1.06-2.02x. Not with a symbolic batch:
    the kernel's 64-bit batch loop fused with the channels leaves a cast in the expansion's
    block bindings, which the schedule's vectorize then refuses."""
    position = {b.var: i for i, b in enumerate(bindings)}
    graph = _Graph(bindings, outputs)
    fused = {}
    for var, chain in chains.items():
        e = chains.get(chain.x)
        if lo <= position.get(var, -1) < hi and e is not None and lo <= position.get(e.last_var, -1) < hi \
                and is_depthwise(chain) and chain.weight.shape[0] == chain.weight.shape[1] * int(chain.x.ty.shape[1]) \
                and runs_dense_kernel(e) and pointwise(e) and e.residual is None and e.pool is None \
                and graph.only_user(e.last_var) is not None and isinstance(e.x.ty.shape[0], tvm.tirx.IntImm):
            fused[var] = e
    return fused
