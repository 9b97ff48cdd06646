"""fscnn_tvm.dense_conv2d (the dense direct-conv kernel) against torch.nn.functional.conv2d."""
import dataclasses

import numpy as np
import pytest
import tvm
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fscnn_tvm import dense, dense_conv2d
from fscnn_tvm.layer import DenseConvLayer
from test_ops import assert_matches, host_avx2, out_size, pad4, pair, rng, torch_conv  # noqa: F401 - rng: fixture

channels = st.integers(1, 40) | st.sampled_from([3, 16, 17, 32, 33, 64])
two_ints = lambda lo, hi: st.tuples(st.integers(lo, hi), st.integers(lo, hi))  # noqa: E731
TARGETS = [None, {"kind": "llvm"}] + (["llvm -mcpu=haswell"] if host_avx2() else [])


@settings(max_examples=80, deadline=None, database=None)
@given(
    n=st.integers(1, 3), c=channels, k=channels,
    h=st.integers(1, 20), w=st.integers(1, 24),
    kh=st.integers(1, 7), kw=st.integers(1, 7),
    stride=st.integers(1, 3) | two_ints(1, 3),
    padding=st.integers(0, 3) | two_ints(0, 3) | st.tuples(*[st.integers(0, 3)] * 4),
    dilation=st.integers(1, 2) | two_ints(1, 2),
    has_bias=st.booleans(), activation=st.sampled_from([None, "relu", "relu6"]),
    seed=st.integers(0, 2**32 - 1), target=st.sampled_from(TARGETS),
)
def test_dense_conv2d_property(n, c, k, h, w, kh, kw, stride, padding, dilation, has_bias, activation, seed,
                               target):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((k, c, kh, kw)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32) if has_bias else None
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = pair(stride), pair(dilation), pad4(padding)
    if out_size(h, pt, pb, kh, sh, dh) < 1 or out_size(w, pl, pr, kw, sw, dw) < 1:
        event("empty output")
        with pytest.raises(ValueError, match="output would be empty"):
            dense_conv2d(x, weight, bias, stride, padding, dilation, activation, target)
        return
    spec = dense.make_dense_spec(x.shape, weight.shape, has_bias, activation, tvm.target.Target(
        {"kind": "llvm", "mcpu": "haswell"} if target else {"kind": "llvm"}), stride, padding, dilation)
    event(f"packs input: {spec.packs}; flattened: {spec.flat_hw is not None}")
    out = dense_conv2d(x, weight, bias, stride, padding, dilation, activation, target)
    assert_matches(out, torch_conv(x, weight, bias, stride, padding, dilation, activation))


@settings(max_examples=40, deadline=None, database=None)
@given(n=st.integers(1, 3), c=channels, k=channels, h=st.integers(1, 30), w=st.integers(1, 30),
       stride=st.integers(1, 3) | two_ints(1, 3), has_bias=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_pointwise_property(n, c, k, h, w, stride, has_bias, seed):
    """1x1 convs without padding: flattened (stride 1) and read in place where the tiles fit."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((k, c, 1, 1)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32) if has_bias else None
    spec = dense.make_dense_spec(x.shape, weight.shape, has_bias, "relu", tvm.target.Target({"kind": "llvm"}),
                                 stride)
    event(f"packs input: {spec.packs}; flattened: {spec.flat_hw is not None}")
    out = dense_conv2d(x, weight, bias, stride, activation="relu", target={"kind": "llvm"})
    assert_matches(out, torch_conv(x, weight, bias, stride, activation="relu"))


def run_spec(spec, x, weight, bias, target):
    """The kernel of ``spec`` (as given, not as make_dense_spec would choose it) on ``x``."""
    from fscnn_tvm.layer import _build
    func = _build(dense.schedule_dense(dense.prim_func(spec), spec), target)
    dev = tvm.cpu()
    arrays = [dense.pack_weight(spec, weight)]
    if bias is not None:
        arrays.append(np.pad(bias, (0, spec.out_blocks * spec.oc_bn - spec.geo.out_channels)))
    args = [tvm.runtime.tensor(x.reshape(spec.x_shape), dev)] + [tvm.runtime.tensor(a, dev) for a in arrays] \
        + [tvm.runtime.empty(spec.out_shape, "float32", dev)]
    func(*args)
    return args[-1].numpy().reshape(spec.layer_out_shape)


@settings(max_examples=40, deadline=None, database=None)
@given(
    n=st.integers(1, 2), c=channels, k=channels, h=st.integers(1, 16), w=st.integers(1, 16),
    kh=st.integers(1, 5), stride=st.integers(1, 3), padding=st.integers(0, 2), dilation=st.integers(1, 2),
    has_bias=st.booleans(), activation=st.sampled_from([None, "relu", "relu6"]),
    chunk=st.integers(1, 64), task_rows=st.integers(1, 20), flat_rows=st.booleans(), reg_n=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_blocked_reduction_property(n, c, k, h, w, kh, stride, padding, dilation, has_bias, activation, chunk,
                                    task_rows, flat_rows, reg_n, seed):
    """The reduction-blocked structure (chunks of input-channel blocks, several rows per task, the
    accumulators in a task buffer between chunks) for any chunk dividing the blocks and any rows
    per task, dividing the output rows or not; with flat_rows, a task's rows as one run of pixels
    (any tile width; rows per task divide the output rows); pointwise convs flattened or read in
    place too."""
    rng = np.random.default_rng(seed)
    if out_size(h, padding, padding, kh, stride, dilation) < 1 or out_size(w, padding, padding, kh, stride,
                                                                           dilation) < 1:
        return
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((k, c, kh, kh)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32) if has_bias else None
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"} if host_avx2() else {"kind": "llvm"})
    spec = dense.make_dense_spec(x.shape, weight.shape, has_bias, activation, target, stride, padding, dilation)
    n_cb, oh = c // spec.ic_bn, spec.geo.out_height
    if flat_rows:
        task_rows = max(d for d in range(1, min(task_rows, oh) + 1) if oh % d == 0)
    spec = dataclasses.replace(spec, cb_chunk=max(d for d in range(1, min(chunk, n_cb) + 1) if n_cb % d == 0),
                               task_rows=task_rows, flat_rows=flat_rows, reg_n=reg_n if flat_rows else spec.reg_n)
    event(f"chunks: {n_cb // spec.cb_chunk}; rows divide: {oh % task_rows == 0}; flat rows: {flat_rows}")
    assert_matches(run_spec(spec, x, weight, bias, target),
                   torch_conv(x, weight, bias, stride, padding, dilation, activation))


def test_reduction_blocking_policy():
    """Blocked where one output block's weights exceed twice the L1d (a 512-channel 3x3 layer),
    not where they fit (64 channels); chunks fill at most half the L1d; a task takes the most rows
    whose accumulators fill at most half the L1d (small maps: all of them)."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    cache = dense.caches(target)
    small = dense.make_dense_spec((1, 64, 56, 56), (64, 64, 3, 3), True, "relu", target, padding=1)
    assert small.cb_chunk is None and small.task_rows == 1
    for shape, w_shape, rows, reg_n in [((1, 512, 14, 14), (512, 512, 3, 3), 14, 4),  # 196 pixels: 49 x 4
                                        ((1, 512, 56, 56), (512, 512, 3, 3), 4, 4),  # accumulators <= L1d / 2
                                        ((1, 512, 7, 7), (512, 512, 3, 3), 7, 5),  # 49 pixels: 10 tiles of 5
                                        ((1, 2048, 7, 7), (512, 2048, 1, 1), 1, 5)]:
        spec = dense.make_dense_spec(shape, w_shape, True, "relu", target, padding=w_shape[2] // 2)
        g = spec.geo
        assert spec.cb_chunk is not None and (g.in_channels // spec.ic_bn) % spec.cb_chunk == 0
        assert spec.cb_chunk * spec.ic_bn * g.kh * g.kw * spec.oc_bn * 4 <= cache.l1d // 2
        assert (spec.task_rows, spec.flat_rows, spec.reg_n) == (rows, rows > 1, reg_n)
        assert spec.layer_out_shape == (1, w_shape[0], shape[2], shape[3])


@pytest.mark.parametrize("shape,kwargs", [
    ((1, 3, 32, 32), dict(k=64, kh=3, padding=1)),                # a CIFAR stem
    ((1, 3, 45, 45), dict(k=64, kh=7, stride=2, padding=3)),      # an ImageNet stem, odd size
    ((2, 64, 14, 14), dict(k=256, kh=1)),                         # pointwise, flattened, no packing
    ((1, 64, 15, 15), dict(k=24, kh=1, stride=2)),                # pointwise stride 2: reads the input in place
    ((1, 32, 7, 7), dict(k=10, kh=3, padding=1)),                 # K not a whole vector block
    ((1, 512, 14, 14), dict(k=40, kh=3, stride=2, padding=1)),    # reduction blocked, 7 rows per task
    ((1, 1024, 7, 7), dict(k=24, kh=1)),                          # pointwise, flattened, blocked
])
def test_dense_layers_of_real_models(rng, shape, kwargs):
    k, kh = kwargs.pop("k"), kwargs.pop("kh")
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((k, shape[1], kh, kh)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    layer = DenseConvLayer(w, x.shape, b, "relu", **kwargs)
    assert_matches(layer(x), torch_conv(x, w, b, kwargs.get("stride", 1), kwargs.get("padding", 0),
                                        activation="relu"))


def test_pointwise_conv_reads_its_input_in_place():
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    spec = dense.make_dense_spec((1, 256, 56, 56), (64, 256, 1, 1), False, None, target)
    assert spec.flat_hw == (56, 56) and spec.ic_bn == 1 and not spec.packs
    assert "x_pack" not in dense.prim_func(spec).script()
    padded = dense.make_dense_spec((1, 64, 56, 56), (64, 64, 3, 3), False, None, target, padding=1)
    assert padded.packs and padded.ic_bn == 16


def test_input_block_keeps_a_taps_slab_small():
    """AVX-512 (32-channel output blocks, 14-pixel tiles): 8 input channels per block; AVX2
    (16-channel blocks, 4-5 pixels): 16; always a divisor of the channels, within TAP_FLOATS."""
    avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    assert dense.make_dense_spec((1, 64, 56, 56), (64, 64, 3, 3), False, None, avx512, padding=1).ic_bn == 8
    assert dense.make_dense_spec((1, 64, 56, 56), (64, 64, 3, 3), False, None, avx2, padding=1).ic_bn == 16
    for c, oc_bn, reg_n in [(48, 32, 14), (3, 32, 14), (24, 16, 4), (7, 64, 30), (512, 16, 4)]:
        ic_bn = dense.input_block(c, oc_bn, reg_n)
        assert c % ic_bn == 0 and ic_bn <= 16 and (ic_bn == 1 or ic_bn * max(oc_bn, reg_n) <= dense.TAP_FLOATS)
    assert dense.input_block(7, 64, 30) == 1 and dense.input_block(48, 32, 14) == 8


@pytest.mark.parametrize("lanes,registers", [(8, 16), (16, 32), (4, 16)])
@pytest.mark.parametrize("out_channels,width", [(64, 56), (64, 7), (10, 14), (512, 28), (3, 224), (256, 3136)])
def test_register_tile_fits_the_registers(lanes, registers, out_channels, width):
    oc_bn, reg_n = dense.register_tile(out_channels, width, lanes, registers)
    vectors = oc_bn // lanes
    assert oc_bn % lanes == 0 and vectors in (1, 2)
    assert vectors * reg_n + vectors + 1 <= registers  # accumulators, weight vectors, one broadcast
    assert reg_n >= (registers - vectors - 1) // vectors * 2 // 3


def test_flattened_rows_take_a_dividing_tile_else_the_widest():
    """A flattened pointwise conv reads its input in place when a tile divides its pixels (3136:
    4 pixels); 49 pixels divide by none of 4-6, the input is packed anyway: the widest, 6."""
    assert dense.register_tile(64, 3136, 8, 16, flat=True) == (16, 4)
    assert dense.register_tile(64, 49, 8, 16, flat=True) == (16, 6)
    assert dense.register_tile(64, 49, 8, 16) == (16, 5)  # a row of a 3x3 conv: least padding
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    spec = dense.make_dense_spec((1, 320, 7, 7), (1280, 320, 1, 1), True, None, target)
    assert spec.flat_hw == (7, 7) and spec.reg_n == 6 and spec.packs


def test_packed_weight_round_trips(rng):
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    w = rng.standard_normal((20, 48, 3, 3)).astype(np.float32)
    spec = dense.make_dense_spec((1, 48, 9, 9), w.shape, False, None, target, padding=1)
    packed = dense.pack_weight(spec, w)
    assert packed.shape == spec.w_pack_shape
    kb, cb, r, s, ci, ko = 1, 2, 0, 2, 5, 3
    assert packed[kb, cb, r, s, ci, ko] == w[kb * spec.oc_bn + ko, cb * spec.ic_bn + ci, r, s]
    assert not packed[1, :, :, :, :, 20 - spec.oc_bn:].any()  # channels past K are zero


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(activation="gelu"), "activation"),
    (dict(bias=np.ones(3, np.float32)), "bias: shape"),
])
def test_bad_arguments(rng, kwargs, pattern):
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    w = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=pattern):
        dense_conv2d(x, w, **kwargs)


def test_wrong_input_channels(rng):
    with pytest.raises(ValueError, match="input channels"):
        dense_conv2d(rng.standard_normal((1, 3, 8, 8)), rng.standard_normal((5, 4, 3, 3)))


@pytest.mark.parametrize("shape,w_shape,kwargs", [
    ((1, 64, 56, 56), (64, 64, 3, 3), dict(padding=1)),
    ((1, 256, 14, 14), (1024, 256, 1, 1), {}),
    ((1, 3, 224, 224), (64, 3, 7, 7), dict(stride=2, padding=3)),
    ((1, 512, 14, 14), (512, 512, 3, 3), dict(padding=1)),  # reduction blocked
])
def test_avx512_kernels_build(shape, w_shape, kwargs):
    """The AVX-512 tile (two 16-lane channel vectors, 10-14 pixels) lowers and compiles; this
    machine may not run it, so only the build is checked here (the AVX2 and generic tiles run above)."""
    from fscnn_tvm import kernels
    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    spec = dense.make_dense_spec(shape, w_shape, True, "relu6", target, **kwargs)
    assert spec.oc_bn == 32 and 2 * spec.reg_n + 3 <= 32
    sch = kernels.default_schedule(kernels.prim_func(spec), spec)
    assert tvm.compile(tvm.IRModule({"main": kernels.lower(sch)}), target=target) is not None


@pytest.mark.parametrize("dynamic", [False, True])
def test_dense_linear_layers_run_the_dense_kernel_in_a_model(dynamic):
    """Linear layers left dense (under the threshold, or the dense baseline) run the dense kernel
    as a 1x1 conv on a 1x1 image, bias and ReLU fused, at a fixed or a dynamic batch."""
    import torch

    import fscnn_tvm
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 37), torch.nn.ReLU(),
                                torch.nn.Linear(37, 5)).eval()
    x = torch.randn(3, 3, 4, 4)
    imported = fscnn_tvm.import_torch(model, (x,), sparse=False, measure=False,
                                      dynamic_batch=(1, 6) if dynamic else None)
    assert sorted(name.rsplit("_", 1)[0] for name in imported.kernels) == ["dense_linear"] * 2
    assert [r.fused for r in imported.report] == [["bias", "relu"], ["bias"]]
    compiled = fscnn_tvm.compile(imported)
    for batch in (1, 3, 6) if dynamic else (3,):
        xb = torch.randn(batch, 3, 4, 4)
        with torch.no_grad():
            ref = model(xb).numpy()
        np.testing.assert_allclose(compiled(xb), ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None, database=None)
@given(parts=st.integers(2, 4), c_part=st.integers(1, 24), k=channels, h=st.integers(1, 16), w=st.integers(1, 16),
       kh=st.sampled_from([1, 3]), stride=st.integers(1, 2), blocked=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_split_reduction_property(parts, c_part, k, h, w, kh, stride, blocked, seed):
    """With ``parts`` (``splitk``), output part p is the conv over input channel range p only,
    for pointwise convs (flattened) and windowed ones, the reduction blocked or not."""
    rng = np.random.default_rng(seed)
    padding = kh // 2
    if out_size(h, padding, padding, kh, stride, 1) < 1 or out_size(w, padding, padding, kh, stride, 1) < 1:
        return
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"} if host_avx2() else {"kind": "llvm"})
    c = parts * c_part
    ic_bn = 1 if kh == 1 else dense.input_block(c_part, 16, 4)  # any whole blocks in each part
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((k, c, kh, kh)).astype(np.float32)
    spec = dense.make_dense_spec(x.shape, weight.shape, False, None, target, stride, padding, parts=parts)
    spec = dataclasses.replace(spec, ic_bn=ic_bn)
    if blocked:
        spec = dataclasses.replace(spec, cb_chunk=max(d for d in range(1, 4) if spec.part_blocks % d == 0))
    event(f"pointwise: {kh == 1}; blocked: {blocked}")
    out = run_spec(spec, x, weight, None, target)
    ref = np.stack([torch_conv(x[:, p * c_part:(p + 1) * c_part], weight[:, p * c_part:(p + 1) * c_part],
                               None, stride, padding) for p in range(parts)], axis=1)
    assert_matches(out.reshape(ref.shape), ref)


def test_a_split_conv_rejects_a_bias_an_activation_and_uneven_parts():
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    with pytest.raises(ValueError, match="bias and activation"):
        dense.make_dense_spec((1, 64, 14, 14), (32, 64, 1, 1), True, None, target, parts=2)
    with pytest.raises(ValueError, match="bias and activation"):
        dense.make_dense_spec((1, 64, 14, 14), (32, 64, 1, 1), False, "relu", target, parts=2)
    with pytest.raises(ValueError, match="do not split into 3 parts"):
        dense.make_dense_spec((1, 64, 14, 14), (32, 64, 1, 1), False, None, target, parts=3)
