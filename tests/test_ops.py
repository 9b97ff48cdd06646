"""fscnn_tvm.sparse_conv2d / sparse_linear against torch.nn.functional conv2d / linear."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fscnn_tvm
from fscnn_tvm import cpuprobe, layer, ops, sparse_conv2d, sparse_linear, tiles
from fscnn_tvm.formats import to_csr
from fscnn_tvm.target import caches, cpu_info, isa

PRIMES = [2, 3, 5, 7, 11, 13, 17]


# ----------------------------------------------------------------------------- helpers

def pair(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


def pad4(padding):
    """(top, left, bottom, right) from an int, (pad_h, pad_w) or a 4-tuple."""
    if isinstance(padding, int):
        return (padding,) * 4
    if len(padding) == 2:
        return padding[0], padding[1], padding[0], padding[1]
    return tuple(padding)


def out_size(size, pad_a, pad_b, k, stride, dilation):
    return (size + pad_a + pad_b - dilation * (k - 1) - 1) // stride + 1


def torch_conv(x, w, b=None, stride=1, padding=0, dilation=1, activation=None):
    """The reference, in float64 so its own rounding does not eat the tolerance."""
    top, left, bottom, right = pad4(padding)
    xt = TF.pad(torch.as_tensor(np.asarray(x), dtype=torch.float64), (left, right, top, bottom))
    wt = torch.as_tensor(np.asarray(w), dtype=torch.float64)
    bt = None if b is None else torch.as_tensor(np.asarray(b), dtype=torch.float64)
    y = TF.conv2d(xt, wt, bt, stride=pair(stride), padding=0, dilation=pair(dilation))
    return activated(y, activation).numpy()


def activated(y, activation):
    if activation == "relu":
        return torch.relu(y)
    return y.clamp(0.0, 6.0) if activation == "relu6" else y


def torch_linear(x, w, b=None, activation=None):
    bt = None if b is None else torch.as_tensor(np.asarray(b), dtype=torch.float64)
    y = TF.linear(torch.as_tensor(np.asarray(x), dtype=torch.float64),
                  torch.as_tensor(np.asarray(w), dtype=torch.float64), bt)
    return activated(y, activation).numpy()


def assert_matches(out, ref):
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = float(np.abs(out.astype(np.float64) - ref).max()) if ref.size else 0.0
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()) if ref.size else 0.0)
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"


def sparse_weight(rng, shape, sparsity):
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0.0
    return w


# ----------------------------------------------------------------------------- properties

channels = st.integers(1, 17) | st.sampled_from(PRIMES)
two_ints = lambda lo, hi: st.tuples(st.integers(lo, hi), st.integers(lo, hi))  # noqa: E731
fmt_block = st.one_of(
    st.just(("csr", None)),
    st.just(("csr", (1, 1))),
    st.tuples(st.just("bsr"), st.none() | two_ints(1, 8)),
)


@settings(max_examples=150, deadline=None, database=None)
@given(
    n=st.integers(1, 4), c=channels, k=channels,
    h=st.integers(1, 20), w=st.integers(1, 20) | st.integers(30, 40),
    kh=st.integers(1, 7), kw=st.integers(1, 7),
    stride=st.integers(1, 3) | two_ints(1, 3),
    padding=st.integers(0, 3) | two_ints(0, 3) | st.tuples(*[st.integers(0, 3)] * 4),
    dilation=st.integers(1, 2) | two_ints(1, 2),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]) | st.floats(0.0, 1.0),
    fb=fmt_block, has_bias=st.booleans(), activation=st.sampled_from([None, "relu", "relu6"]),
    seed=st.integers(0, 2**32 - 1), band=st.integers(0, 8), chunk=st.integers(0, 8), shared=st.integers(1, 4),
    interleave=st.booleans(),
)
def test_conv2d_property(n, c, k, h, w, kh, kw, stride, padding, dilation, sparsity, fb, has_bias,
                         activation, seed, band, chunk, shared, interleave):
    """``band`` > 0: the input laid out band by band, with any band height that divides the output;
    ``chunk`` > 0: the reduction in chunks of any size that divides the input channels (where the
    kernel can chunk: one column per slot, at most 4 channels per row), a CSR weight run as
    ``shared`` channels per table row; ``interleave``: in interleaved rows wherever the conv
    allows, whatever its nonzeros."""
    with pytest.MonkeyPatch.context() as patch:
        if interleave:
            patch.setattr(tiles, "INTERLEAVE_NONZEROS", 0)
            patch.setattr(ops, "interleavable", lambda spec: event_if(interleavable(spec), "interleaved rows"))
        if band:
            patch.setattr(ops, "band_rows_for", lambda layout, cache, *_: banded(layout.geo, band))
        if chunk:
            patch.setattr(ops, "chunking", lambda spec, mean_row: chunked(spec, chunk))
            patch.setattr(ops, "shared_channels", lambda spec, sharing: shared)
        check_conv2d(n, c, k, h, w, kh, kw, stride, padding, dilation, sparsity, fb, has_bias, activation, seed)


interleavable = ops.interleavable


def event_if(flag, name):
    if flag:
        event(name)
    return flag


def chunked(spec, pick):
    """The ``pick``-th (cyclically) chunk size that divides ``spec``'s input channels, where it chunks."""
    if not tiles.chunkable(spec):
        return None
    divisors = [d for d in range(1, spec.geo.in_channels + 1) if spec.geo.in_channels % d == 0]
    event(f"chunks: {spec.geo.in_channels // divisors[pick % len(divisors)]}")
    return divisors[pick % len(divisors)]


def banded(geo, pick):
    """The ``pick``-th (cyclically) band height that divides ``geo``'s output rows."""
    divisors = [r for r in range(1, geo.out_height + 1) if geo.out_height % r == 0]
    event(f"bands: {geo.out_height // divisors[pick % len(divisors)]}")
    return divisors[pick % len(divisors)]


def check_conv2d(n, c, k, h, w, kh, kw, stride, padding, dilation, sparsity, fb, has_bias, activation, seed):
    fmt, block = fb
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = sparse_weight(rng, (k, c, kh, kw), sparsity)
    bias = rng.standard_normal(k).astype(np.float32) if has_bias else None
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = pair(stride), pair(dilation), pad4(padding)
    oh, ow = out_size(h, pt, pb, kh, sh, dh), out_size(w, pl, pr, kw, sw, dw)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, fmt=fmt, block=block, activation=activation)
    if oh < 1 or ow < 1:
        event("empty output")
        with pytest.raises(ValueError, match="output would be empty"):
            sparse_conv2d(x, weight, bias, **kwargs)
        return
    out = sparse_conv2d(x, weight, bias, **kwargs)
    assert_matches(out, torch_conv(x, weight, bias, stride, padding, dilation, activation))


@settings(max_examples=150, deadline=None, database=None)
@given(
    n=st.integers(1, 4) | st.sampled_from([8, 9, 16, 17]), fin=st.integers(1, 300) | st.sampled_from(PRIMES),
    fout=st.integers(1, 300) | st.sampled_from(PRIMES),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]) | st.floats(0.0, 1.0),
    fb=fmt_block, has_bias=st.booleans(), activation=st.sampled_from([None, "relu", "relu6"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_linear_property(n, fin, fout, sparsity, fb, has_bias, activation, seed):
    fmt, block = fb
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, fin)).astype(np.float32)
    weight = sparse_weight(rng, (fout, fin), sparsity)
    bias = rng.standard_normal(fout).astype(np.float32) if has_bias else None
    out = sparse_linear(x, weight, bias, fmt=fmt, block=block, activation=activation)
    assert_matches(out, torch_linear(x, weight, bias, activation))


# ----------------------------------------------------------------------------- named cases

FORMATS = [("csr", None), ("bsr", (4, 1)), ("bsr", (3, 2)), ("bsr", (1, 1))]
fmt_ids = ["csr", "bsr4x1", "bsr3x2", "bsr1x1"]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("fmt,block", FORMATS, ids=fmt_ids)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_all_zero_weight(rng, fmt, block, activation):
    x = rng.standard_normal((2, 5, 8, 9)).astype(np.float32)
    w = np.zeros((6, 5, 3, 3), np.float32)
    b = np.array([-2, -1, 0, 1, 2, 3], np.float32)
    out = sparse_conv2d(x, w, b, padding=1, fmt=fmt, block=block, activation=activation)
    expected = np.broadcast_to((np.maximum(b, 0) if activation else b)[None, :, None, None], (2, 6, 8, 9))
    np.testing.assert_array_equal(out, expected)
    out = sparse_conv2d(x, w, None, padding=1, fmt=fmt, block=block)
    np.testing.assert_array_equal(out, np.zeros((2, 6, 8, 9), np.float32))
    lin = sparse_linear(x.reshape(2, -1)[:, :30], np.zeros((7, 30), np.float32), fmt=fmt, block=block)
    np.testing.assert_array_equal(lin, np.zeros((2, 7), np.float32))


@pytest.mark.parametrize("fmt,block", FORMATS, ids=fmt_ids)
def test_zero_output_channels(rng, fmt, block):
    x = rng.standard_normal((1, 4, 7, 6)).astype(np.float32)
    w = sparse_weight(rng, (9, 4, 3, 3), 0.3)
    w[[0, 3, 4, 8]] = 0.0  # first, last and a run in the middle
    b = rng.standard_normal(9).astype(np.float32)
    out = sparse_conv2d(x, w, b, fmt=fmt, block=block)
    ref = torch_conv(x, w, b)
    assert_matches(out, ref)
    for ch in (0, 3, 4, 8):
        np.testing.assert_array_equal(out[0, ch], np.full((5, 4), b[ch], np.float32))
    assert np.abs(out[0, 1] - b[1]).max() > 1e-3  # a live channel is not just its bias
    wl = sparse_weight(rng, (9, 20), 0.3)
    wl[[0, 3, 4, 8]] = 0.0
    xl = rng.standard_normal((3, 20)).astype(np.float32)
    assert_matches(sparse_linear(xl, wl, b, fmt=fmt, block=block), torch_linear(xl, wl, b))


@pytest.mark.parametrize("fmt,block", FORMATS, ids=fmt_ids)
def test_single_nonzero(rng, fmt, block):
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    w = np.zeros((5, 3, 3, 2), np.float32)
    w[2, 1, 2, 1] = 1.5
    out = sparse_conv2d(x, w, fmt=fmt, block=block)
    expected = np.zeros((2, 5, 4, 6), np.float32)
    expected[:, 2] = 1.5 * x[:, 1, 2:6, 1:7]  # output (i, j) reads x[i + 2, j + 1]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=0)
    wl = np.zeros((4, 11), np.float32)
    wl[3, 10] = -2.0
    xl = rng.standard_normal((2, 11)).astype(np.float32)
    lin = sparse_linear(xl, wl, fmt=fmt, block=block)
    np.testing.assert_allclose(lin, np.stack([np.zeros(2)] * 3 + [-2.0 * xl[:, 10]], 1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt,block", FORMATS, ids=fmt_ids)
@pytest.mark.parametrize("torch_inputs", [False, True])
def test_fully_dense_weight(rng, fmt, block, torch_inputs):
    x = rng.standard_normal((2, 6, 9, 10)).astype(np.float32)
    w = rng.uniform(0.1, 1.0, (7, 6, 3, 3)).astype(np.float32) * rng.choice([-1, 1], (7, 6, 3, 3))
    b = rng.standard_normal(7).astype(np.float32)
    args = (torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)) if torch_inputs else (x, w, b)
    out = sparse_conv2d(*args, padding=1, fmt=fmt, block=block)
    assert_matches(out, torch_conv(x, w, b, padding=1))
    wl = rng.standard_normal((13, 54)).astype(np.float32)
    xl = x.reshape(2, -1)[:, :54]
    assert_matches(sparse_linear(xl, wl, b[:1].repeat(13), fmt=fmt, block=block),
                   torch_linear(xl, wl, b[:1].repeat(13)))


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("fmt,block", FORMATS[:3], ids=fmt_ids[:3])
def test_bias_and_relu(rng, has_bias, activation, fmt, block):
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    w = sparse_weight(rng, (5, 4, 3, 3), 0.5)
    b = (rng.standard_normal(5) * 3).astype(np.float32) if has_bias else None
    out = sparse_conv2d(x, w, b, padding=(1, 0), fmt=fmt, block=block, activation=activation)
    ref = torch_conv(x, w, b, padding=(1, 0), activation=activation)
    assert_matches(out, ref)
    if activation == "relu":
        assert (out >= 0).all() and (out == 0).any()
    else:
        assert (out < 0).any()
    xl = rng.standard_normal((3, 17)).astype(np.float32)
    wl = sparse_weight(rng, (5, 17), 0.5)
    assert_matches(sparse_linear(xl, wl, b, fmt=fmt, block=block, activation=activation),
                   torch_linear(xl, wl, b, activation))


@pytest.mark.parametrize("fmt,block", FORMATS, ids=fmt_ids)
def test_batch_greater_than_one(rng, fmt, block):
    x = rng.standard_normal((4, 3, 8, 5)).astype(np.float32)
    w = sparse_weight(rng, (6, 3, 3, 3), 0.6)
    out = sparse_conv2d(x, w, padding=1, fmt=fmt, block=block)
    assert_matches(out, torch_conv(x, w, padding=1))
    for i in range(4):  # each batch item alone gives the same answer
        np.testing.assert_allclose(sparse_conv2d(x[i:i + 1], w, padding=1, fmt=fmt, block=block), out[i:i + 1],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,block", FORMATS, ids=fmt_ids)
def test_1x1_conv(rng, fmt, block):
    x = rng.standard_normal((2, 16, 7, 7)).astype(np.float32)
    w = sparse_weight(rng, (24, 16, 1, 1), 0.8)
    b = rng.standard_normal(24).astype(np.float32)
    out = sparse_conv2d(x, w, b, fmt=fmt, block=block)
    ref = np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.float64), x) + b[None, :, None, None]
    assert_matches(out, ref)
    assert_matches(out, torch_conv(x, w, b))


@pytest.mark.parametrize("fmt,block", FORMATS, ids=fmt_ids)
@pytest.mark.parametrize("padding", [0, 1, (0, 1, 1, 0)])
def test_stride_2(rng, fmt, block, padding):
    x = rng.standard_normal((2, 5, 13, 16)).astype(np.float32)
    w = sparse_weight(rng, (8, 5, 3, 3), 0.7)
    out = sparse_conv2d(x, w, stride=2, padding=padding, fmt=fmt, block=block, activation="relu")
    ref = torch_conv(x, w, stride=2, padding=padding, activation="relu")
    assert_matches(out, ref)


@pytest.mark.parametrize("fmt,block", FORMATS, ids=fmt_ids)
@pytest.mark.parametrize("x_hw,kernel,stride", [
    ((1, 1), (1, 1), 1), ((1, 2), (1, 1), 1), ((1, 3), (1, 1), 1), ((2, 1), (1, 1), 1),
    ((3, 3), (3, 3), 1), ((5, 5), (5, 5), 1), ((4, 4), (3, 3), 2), ((1, 9), (1, 1), 3),
])
def test_tiny_outputs(rng, fmt, block, x_hw, kernel, stride):
    """Output rows much narrower than a vector: the row is padded to whole vectors, so the
    input layout needs a zero tail longer than a whole (tiny) phase plane, and the epilogue
    has unit loops. Both used to break the schedule (ScheduleError)."""
    x = rng.standard_normal((2, 3) + x_hw).astype(np.float32)
    w = sparse_weight(rng, (5, 3) + kernel, 0.3)
    b = rng.standard_normal(5).astype(np.float32)
    out = sparse_conv2d(x, w, b, stride=stride, fmt=fmt, block=block, activation="relu")
    assert_matches(out, torch_conv(x, w, b, stride=stride, activation="relu"))


def test_asymmetric_padding_order(rng):
    # (top, left, bottom, right): a one-hot centre tap makes the output a shifted copy of x,
    # so swapping any two sides shows up as a shifted or wrongly sized output.
    x = rng.standard_normal((1, 1, 5, 6)).astype(np.float32)
    w = np.zeros((1, 1, 3, 3), np.float32)
    w[0, 0, 1, 1] = 1.0
    out = sparse_conv2d(x, w, padding=(1, 0, 2, 3))
    assert out.shape == (1, 1, 5 + 1 + 2 - 2, 6 + 0 + 3 - 2)
    padded = np.zeros((1, 1, 8, 9), np.float32)
    padded[:, :, 1:6, 0:6] = x
    np.testing.assert_array_equal(out, padded[:, :, 1:7, 1:8])


def test_dilation_and_nonsquare_kernel(rng):
    x = rng.standard_normal((1, 3, 11, 9)).astype(np.float32)
    w = sparse_weight(rng, (4, 3, 2, 5), 0.5)
    for stride in [1, (1, 2), (3, 1)]:
        out = sparse_conv2d(x, w, stride=stride, padding=(2, 1), dilation=(2, 1))
        assert_matches(out, torch_conv(x, w, stride=stride, padding=(2, 1), dilation=(2, 1)))


def host_avx2():
    import platform
    return platform.machine().lower() in ("x86_64", "amd64") and isa(cpu_info()["flags"]) in ("avx2", "avx512")


@pytest.mark.parametrize("target", [
    {"kind": "llvm"},  # no mcpu: 4 lanes
    "llvm -num-cores 1",
    pytest.param("llvm -mcpu=haswell", marks=pytest.mark.skipif(not host_avx2(), reason="needs AVX2")),
    None,
])
def test_explicit_targets(rng, target):
    x = rng.standard_normal((1, 3, 9, 21)).astype(np.float32)
    w = sparse_weight(rng, (5, 3, 3, 3), 0.5)
    out = sparse_conv2d(x, w, padding=1, fmt="bsr", block=(2, 1), target=target)
    assert_matches(out, torch_conv(x, w, padding=1))
    xl = rng.standard_normal((2, 40)).astype(np.float32)
    wl = sparse_weight(rng, (9, 40), 0.5)
    assert_matches(sparse_linear(xl, wl, fmt="bsr", block=(4, 1), target=target), torch_linear(xl, wl))


# ----------------------------------------------------------------------------- SparseLayer

def test_sparse_layer_direct(rng):
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = sparse_weight(rng, (4, 3, 3, 3), 0.5)
    b = rng.standard_normal(4).astype(np.float32)
    layer = fscnn_tvm.SparseLayer("conv2d", to_csr(w), x.shape, bias=b, stride=1, padding=1)
    ref = torch_conv(x, w, b, padding=1)
    assert_matches(layer(x), ref)
    assert_matches(layer.runner(x)().numpy(), ref)
    with pytest.raises(ValueError, match="built for"):
        layer(x[:1])
    with pytest.raises(ValueError, match=r"bias: shape \(3,\), expected \(4,\)"):
        fscnn_tvm.SparseLayer("conv2d", w, x.shape, bias=b[:3])
    with pytest.raises(NotImplementedError, match="groups=2"):
        fscnn_tvm.SparseLayer("conv2d", w, x.shape, groups=2)


# ----------------------------------------------------------------------------- the design space

def _uneven_rows(rng, shape):
    """A weight whose rows range from empty to dense, so tiles bound their loops differently."""
    w = rng.standard_normal(shape).astype(np.float32)
    keep = rng.random(shape) < rng.random((shape[0],) + (1,) * (len(shape) - 1)) ** 2
    keep[1] = False
    return w * keep


@pytest.mark.parametrize("fmt,block", FORMATS)
def test_pointwise_conv_runs_on_the_flattened_image(rng, fmt, block):
    # 16 rows of 6 pad to 16 x 8 lanes; flattened, 96 pixels are whole vectors (8 or 16 lanes).
    x = rng.standard_normal((2, 6, 16, 6)).astype(np.float32)
    w, b = _uneven_rows(rng, (10, 6, 1, 1)), rng.standard_normal(10).astype(np.float32)
    layer = fscnn_tvm.SparseLayer("conv2d", w, x.shape, bias=b, fmt=fmt, block=block, activation="relu")
    assert layer.spec.flat_hw == (16, 6) and layer.spec.out_shape == (2, 10, 1, 96)
    ref = torch_conv(x, w, b, activation="relu")
    assert_matches(layer(x), ref)
    assert_matches(layer.runner(x)().numpy(), ref)
    # Padding or stride keep the per-row kernel.
    assert fscnn_tvm.SparseLayer("conv2d", w, x.shape, padding=1).spec.flat_hw is None
    assert fscnn_tvm.SparseLayer("conv2d", w, x.shape, stride=2).spec.flat_hw is None


@pytest.mark.parametrize("fin,dtype", [(32768, np.int16), (32769, np.int32)])
def test_linear_offsets_int16_where_they_fit(rng, fin, dtype):
    # The last column is the one an int16 offset must still reach (or overflow into a wrong read).
    w = np.zeros((3, fin), np.float32)
    w[:, -1] = [1.0, 2.0, 3.0]
    w[1, :: 997] = rng.standard_normal(len(range(0, fin, 997)))
    x = rng.standard_normal((2, fin)).astype(np.float32)
    layer = fscnn_tvm.SparseLayer("linear", w, x.shape)
    assert layer.arrays[1].dtype == dtype
    assert_matches(layer(x), torch_linear(x, w))

# ----------------------------------------------------------------------------- errors

X = np.ones((1, 4, 8, 8), np.float32)
W = np.ones((3, 4, 3, 3), np.float32)


@pytest.mark.parametrize("groups", [2, 4, 0])
def test_groups_not_supported(groups):
    with pytest.raises(NotImplementedError, match=f"groups={groups}"):
        sparse_conv2d(X, W, groups=groups)


@pytest.mark.parametrize("x,pattern", [
    (np.ones((4, 8, 8), np.float32), r"x: expected NCHW \(rank 4\)"),
    (np.ones((1, 1, 4, 8, 8), np.float32), r"x: expected NCHW \(rank 4\)"),
    (np.ones((1, 3, 8, 8), np.float32), r"weight has 4 input channels but x has 3"),
    (np.ones((1, 5, 8, 8), np.float32), r"weight has 4 input channels but x has 5"),
    (np.ones((0, 4, 8, 8), np.float32), r"empty dimension"),
])
def test_conv_bad_x(x, pattern):
    with pytest.raises(ValueError, match=pattern):
        sparse_conv2d(x, W)


def test_a_nan_input_gives_nan_where_a_nonzero_weight_reads_it_in_both_apis():
    rng = np.random.default_rng(3)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1).eval()
    with torch.no_grad():
        w = conv.weight.numpy()
        w[rng.random(w.shape) < 0.8] = 0.0
        w[:, 1] = 0.0
        w[5, 1, 1, 1] = 1.0  # input channel 1 reaches output channel 5 only, through the centre tap
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    x[0, 1, 3, 3] = np.nan
    compiled = fscnn_tvm.compile(fscnn_tvm.import_torch(conv, (torch.from_numpy(x),), sparsity_threshold=0.0,
                                                        fmt="csr", measure=False))
    functional = sparse_conv2d(x, w, conv.bias.detach().numpy(), padding=1)
    np.testing.assert_allclose(functional, compiled(x), rtol=1e-5, atol=1e-5)  # NaNs in the same places
    assert [tuple(i) for i in np.argwhere(np.isnan(functional))] == [(0, 5, 3, 3)]
    with torch.no_grad():  # dense PyTorch: 0 * NaN = NaN in every channel around the pixel
        assert np.isnan(conv(torch.from_numpy(x)).numpy()).sum() == 8 * 9
    with pytest.raises(ValueError, match=r"weight: 1 non-finite"):
        sparse_conv2d(np.nan_to_num(x), np.where(w == 1.0, np.nan, w), padding=1)


@pytest.mark.parametrize("weight,pattern", [
    (np.ones((3, 4, 3), np.float32), r"rank 3"),
    (np.ones((3, 36), np.float32), r"weight: expected OIHW"),
])
def test_conv_bad_weight(weight, pattern):
    with pytest.raises(ValueError, match=pattern):
        sparse_conv2d(X, weight)


@pytest.mark.parametrize("x,pattern", [
    (np.ones((2, 3, 5), np.float32), r"x: expected \(batch, in_features\)"),
    (np.ones(5, np.float32), r"x: expected \(batch, in_features\)"),
    (np.ones((2, 6), np.float32), r"weight has 5 input features but x has 6"),
    (np.ones((0, 5), np.float32), r"batch must be >= 1"),
])
def test_linear_bad_x(x, pattern):
    with pytest.raises(ValueError, match=pattern):
        sparse_linear(x, np.ones((3, 5), np.float32))


def test_linear_bad_weight_rank():
    with pytest.raises(ValueError, match=r"weight: expected \(out_features, in_features\)"):
        sparse_linear(np.ones((2, 5), np.float32), np.ones((3, 5, 1, 1), np.float32))


@pytest.mark.parametrize("padding", ["same", "valid", "1"])
def test_string_padding(padding):
    with pytest.raises(ValueError, match="string padding"):
        sparse_conv2d(X, W, padding=padding)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(padding=(1, 2, 3)), r"padding: expected"),
    (dict(padding=-1), r"padding >= 0"),
    (dict(stride=0), r"stride and dilation must be >= 1"),
    (dict(dilation=0), r"stride and dilation must be >= 1"),
    (dict(stride=(1, 2, 3)), r"stride: expected an int or a pair"),
    (dict(padding=1.5), r"padding: expected an int, .* got 1.5"),
    (dict(padding=(1, 1.5)), r"padding: expected"),  # not truncated to (1, 1)
    (dict(padding=True), r"padding: expected"),
    (dict(stride=1.5), r"stride: expected an int or a pair of ints, got 1.5"),
    (dict(dilation=(1, None)), r"dilation: expected"),
])
def test_bad_geometry(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        sparse_conv2d(X, W, **kwargs)


@pytest.mark.parametrize("activation", ["gelu", "ReLU", "sigmoid", ""])
def test_unknown_activation(activation):
    with pytest.raises(ValueError, match="activation"):
        sparse_conv2d(X, W, activation=activation)
    with pytest.raises(ValueError, match="activation"):
        sparse_linear(np.ones((1, 4), np.float32), np.ones((2, 4), np.float32), activation=activation)


@pytest.mark.parametrize("x_hw,kernel,kwargs", [
    ((3, 3), (5, 5), {}),
    ((8, 8), (1, 9), {}),
    ((4, 4), (3, 3), dict(dilation=2)),
    ((2, 2), (4, 4), dict(padding=(0, 1))),
])
def test_empty_output(x_hw, kernel, kwargs):
    x = np.ones((1, 2) + x_hw, np.float32)
    w = np.ones((3, 2) + kernel, np.float32)
    with pytest.raises(ValueError, match="output would be empty"):
        sparse_conv2d(x, w, **kwargs)


@pytest.mark.parametrize("target", ["cuda", "opencl", {"kind": "cuda"}, "", 3])
def test_unsupported_target(target):
    with pytest.raises(ValueError, match="target"):
        sparse_conv2d(X, W, target=target)
    with pytest.raises(ValueError, match="target"):
        sparse_linear(np.ones((1, 4), np.float32), np.ones((2, 4), np.float32), target=target)


@pytest.mark.parametrize("block", [3, (2,), (0, 1), "ab"])
def test_bad_block_via_op(block):
    with pytest.raises(ValueError, match="block"):
        sparse_conv2d(X, W, fmt="bsr", block=block)
    with pytest.raises(ValueError, match="block"):
        sparse_linear(np.ones((1, 4), np.float32), np.ones((2, 4), np.float32), fmt="bsr", block=block)


def test_bad_fmt_via_op():
    with pytest.raises(ValueError, match="unknown sparse format"):
        sparse_conv2d(X, W, fmt="coo")
    with pytest.raises(ValueError, match="fmt='csr'"):
        sparse_conv2d(X, W, fmt="csr", block=(2, 2))


# ----------------------------------------------------------------------------- layer cache

def test_cache_same_arguments(rng):
    x = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
    w = sparse_weight(rng, (5, 3, 3, 3), 0.5)
    b = rng.standard_normal(5).astype(np.float32)
    first = sparse_conv2d(x, w, b, padding=1, fmt="bsr", block=(2, 2))
    n_layers = len(layer._LAYERS)
    second = sparse_conv2d(x, w, b, padding=1, fmt="bsr", block=(2, 2))
    np.testing.assert_array_equal(first, second)
    assert len(layer._LAYERS) == n_layers  # reused, not rebuilt
    assert_matches(first, torch_conv(x, w, b, padding=1))
    # A new input through the cached layer is computed afresh.
    x2 = rng.standard_normal(x.shape).astype(np.float32)
    third = sparse_conv2d(x2, w, b, padding=1, fmt="bsr", block=(2, 2))
    assert_matches(third, torch_conv(x2, w, b, padding=1))
    assert np.abs(third - first).max() > 1e-2


@pytest.mark.parametrize("fmt,block", FORMATS[:3], ids=fmt_ids[:3])
def test_cache_different_weights_same_shape(rng, fmt, block):
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    w1 = sparse_weight(rng, (5, 4, 3, 3), 0.5)
    w2 = np.where(w1 != 0, rng.standard_normal(w1.shape), 0).astype(np.float32)  # same pattern: same kernel
    w3 = sparse_weight(rng, (5, 4, 3, 3), 0.5)  # another pattern
    outs = []
    for w in (w1, w2, w3):
        out = sparse_conv2d(x, w, padding=1, fmt=fmt, block=block)
        assert_matches(out, torch_conv(x, w, padding=1))
        outs.append(out)
    assert np.abs(outs[0] - outs[1]).max() > 1e-2
    assert np.abs(outs[0] - outs[2]).max() > 1e-2
    # Same for bias only differing, and linear.
    b1, b2 = np.zeros(5, np.float32), np.ones(5, np.float32)
    np.testing.assert_allclose(sparse_conv2d(x, w1, b2, padding=1, fmt=fmt, block=block)
                               - sparse_conv2d(x, w1, b1, padding=1, fmt=fmt, block=block), 1.0, atol=1e-5)
    xl = rng.standard_normal((2, 12)).astype(np.float32)
    wl1 = sparse_weight(rng, (6, 12), 0.5)
    wl2 = sparse_weight(rng, (6, 12), 0.5)
    assert_matches(sparse_linear(xl, wl1, fmt=fmt, block=block), torch_linear(xl, wl1))
    assert_matches(sparse_linear(xl, wl2, fmt=fmt, block=block), torch_linear(xl, wl2))


def test_cache_sees_in_place_weight_change(rng):
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = sparse_weight(rng, (3, 2, 3, 3), 0.3)
    first = sparse_conv2d(x, w)
    w *= 2.0  # same object, new values
    second = sparse_conv2d(x, w)
    np.testing.assert_allclose(second, 2.0 * first, rtol=1e-5, atol=1e-5)


def test_cache_keyed_on_geometry_and_activation(rng):
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    w = sparse_weight(rng, (3, 2, 3, 3), 0.3)
    for kwargs in (dict(), dict(padding=1), dict(stride=2), dict(activation="relu"), dict(dilation=2)):
        out = sparse_conv2d(x, w, **kwargs)
        assert_matches(out, torch_conv(x, w, **kwargs))


@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", (8, 1))])
def test_vgg16_first_sparse_layer_runs_banded(fmt, block):
    """The policy's own choice on a real layer (64->64 at 224x224: its 12 MiB layout exceeds
    the L2 of any CPU we target, so it runs banded whatever this machine's caches)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 64, 224, 224)).astype(np.float32)
    w = sparse_weight(rng, (64, 64, 3, 3), 0.9)
    layer = fscnn_tvm.SparseLayer("conv2d", w, x.shape, fmt=fmt, block=block, padding=1, activation="relu")
    assert layer.spec.band_rows and layer.spec.band_rows == tiles.band_rows_for(dataclasses.replace(layer.spec.layout, band_rows=None), caches(layer.target))
    assert_matches(layer(x), torch_conv(x, w, padding=1, activation="relu"))


@settings(max_examples=40, deadline=None, database=None)
@given(n=st.integers(1, 2), per_group=st.integers(1, 3), groups=st.integers(1, 12), mult=st.integers(1, 2),
       hw=st.integers(3, 16), kh=st.sampled_from([1, 3, 5]), stride=st.integers(1, 2), padding=st.integers(0, 2),
       sparsity=st.sampled_from([0.0, 0.5]), activation=st.sampled_from([None, "relu6"]),
       seed=st.integers(0, 2**32 - 1))
def test_grouped_conv_on_the_block_diagonal_csr(n, per_group, groups, mult, hw, kh, stride, padding, sparsity,
                                                 activation, seed):
    """Grouped and depthwise convs (``per_group`` = 1) on the sparse kernel via ``grouped_to_csr``."""
    rng = np.random.default_rng(seed)
    c, k = per_group * groups, per_group * groups * mult
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = sparse_weight(rng, (k, per_group, kh, kh), sparsity)
    b = rng.standard_normal(k).astype(np.float32)
    if out_size(hw, padding, padding, kh, stride, 1) < 1:
        return
    from fscnn_tvm.formats import grouped_to_csr
    out = layer.SparseLayer("conv2d", grouped_to_csr(w, groups), x.shape, b, activation=activation,
                            stride=stride, padding=padding)(x)
    ref = TF.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), torch.from_numpy(b).double(),
                    stride, padding, 1, groups)
    assert_matches(out, activated(ref, activation).numpy())



def test_a_conv_read_in_place_keeps_its_input_rows(rng):
    """A 5x5 conv without padding whose output rows are whole vectors reads its input where it
    lies: its windows step by the input's own rows (12 wide), not by a laid-out row's width."""
    x = rng.standard_normal((1, 6, 12, 12)).astype(np.float32)
    w = sparse_weight(rng, (4, 6, 5, 5), 0.5)
    layer_ = fscnn_tvm.SparseLayer("conv2d", w, x.shape)
    assert layer_.spec.in_place and layer_.spec.layout.width == 12
    assert_matches(layer_(x), torch_conv(x, w))


@pytest.mark.parametrize("batch,hw,sparsity", [(1, (14, 14), 0.9), (3, (7, 7), 0.9), (2, (13, 17), 0.7), (1, (3, 3), 0.5)])
def test_a_pointwise_conv_whose_pixels_are_not_whole_vectors_reads_its_input_in_place(rng, batch, hw, sparsity):
    """On a CPU with mask registers a pointwise conv of few reads per input element runs on its
    image flattened and read where it lies, the windows of each row's last vector masked past the
    row; without mask registers (AVX2) it keeps the layout pass. Outputs as PyTorch's either way."""
    x = rng.standard_normal((batch, 40, *hw)).astype(np.float32)
    w = sparse_weight(rng, (24, 40, 1, 1), sparsity)
    b = rng.standard_normal(24).astype(np.float32)
    for name, masked in (("znver4", True), ("znver3", False)):
        target = fscnn_tvm.resolve_target({"kind": "llvm", "mcpu": name, "num-cores": 2})
        spec, _ = ops.kernel_inputs("conv2d", to_csr(w), x.shape, b, "relu", target)
        assert spec.masked_row == masked and spec.in_place == masked
        assert not masked or (spec.flat_hw == hw and spec.x_shape == (batch, 40 * hw[0] * hw[1]))
    assert_matches(fscnn_tvm.SparseLayer("conv2d", w, x.shape, b, activation="relu")(x),
                   torch_conv(x, w, b, activation="relu"))


def test_a_pointwise_conv_that_reads_each_input_many_times_keeps_aligned_windows(rng):
    """Past ``MASKED_ROW_READS`` nonzeros per input channel the unaligned windows of an input
    read in place cost more than the layout pass saves: the layout pass stays."""
    target = fscnn_tvm.resolve_target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    shape = (1, 16, 7, 7)
    few = sparse_weight(rng, (ops.MASKED_ROW_READS, 16, 1, 1), 0.5)
    many = sparse_weight(rng, (4 * ops.MASKED_ROW_READS, 16, 1, 1), 0.0)
    assert ops.kernel_inputs("conv2d", to_csr(few), shape, None, None, target)[0].masked_row
    assert not ops.kernel_inputs("conv2d", to_csr(many), shape, None, None, target)[0].masked_row


@pytest.mark.parametrize("shape,stride,kernel,expected", [
    ((1, 8, 40, 40), 1, 3, True),     # 40 columns: 3 vectors of 16 (or 5 of 8)
    ((2, 8, 40, 40), 1, (1, 5), True),
    ((1, 8, 40, 40), 2, 3, False),    # stride 2
    ((1, 8, 40, 40), 1, 1, False),    # 1x1: every window starts where its row does
    ((1, 8, 40, 12), 1, 3, False),    # 12 columns: under two cache lines a row
    ((1, 8, 40, 40), 1, (3, 1), False),
])
def test_interleaved_rows_where_windows_start_unaligned(rng, shape, stride, kernel, expected):
    """Convs with as many nonzeros per channel as ``INTERLEAVE_NONZEROS`` read interleaved rows
    where the conv allows it, and compute the conv."""
    kh, kw = pair(kernel)
    w = sparse_weight(rng, (6, shape[1], kh, kw), 0.0)
    b = rng.standard_normal(6).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    padding = (kh // 2, kw // 2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiles, "INTERLEAVE_NONZEROS", kh * kw * shape[1])
        spec, _ = ops.kernel_inputs("conv2d", to_csr(w), x.shape, b, "relu6", fscnn_tvm.resolve_target(None),
                                    stride=stride, padding=padding)
        assert spec.interleaved == expected
        if expected:
            assert spec.layout.width == (spec.padded_width // spec.lanes + kw - 1) * spec.lanes
        patch.setattr(tiles, "INTERLEAVE_NONZEROS", kh * kw * shape[1] + 1)  # one nonzero short
        assert not ops.kernel_inputs("conv2d", to_csr(w), x.shape, b, "relu6", fscnn_tvm.resolve_target(None),
                                     stride=stride, padding=padding)[0].interleaved
        patch.setattr(tiles, "INTERLEAVE_NONZEROS", 0)
        layer._LAYERS.clear()
        out = sparse_conv2d(x, w, b, stride=stride, padding=padding, activation="relu6")
    assert_matches(out, torch_conv(x, w, b, stride, padding, activation="relu6"))


@pytest.mark.parametrize("hw,cost,masked", [((14, 14), cpuprobe.FULL_RATE, True), ((14, 14), cpuprobe.HALF_RATE, False),
                                            ((7, 7), cpuprobe.HALF_RATE, True)])
def test_masked_rows_at_half_width_need_fewer_reads_where_half_width_costs_more(rng, monkeypatch, hw, cost, masked):
    """Between ``MASKED_HALF_ROW_READS`` and ``MASKED_ROW_READS`` reads a 14x14 pointwise conv
    (masked rows of 8 lanes, laid-out rows of 14 at 16) keeps its layout pass where the CPU runs
    half-width ops slower; a 7x7 one (8 lanes either way) reads in place on any CPU."""
    monkeypatch.setattr(ops, "half_width_cost", lambda target: cost)
    target = fscnn_tvm.resolve_target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    reads = (ops.MASKED_HALF_ROW_READS + ops.MASKED_ROW_READS) // 2
    w = sparse_weight(rng, (reads, 16, 1, 1), 0.0)
    spec, _ = ops.kernel_inputs("conv2d", to_csr(w), (1, 16, *hw), None, None, target)
    assert spec.masked_row == masked
