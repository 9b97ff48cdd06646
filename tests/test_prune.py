import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fscnn_tvm import prune, zoo
from fscnn_tvm.formats import to_bsr


def weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def zeros(t):
    return t.numel() - int(torch.count_nonzero(t))


def small_net(seed=0):
    """First conv, a plain conv, a depthwise conv, a 1x1 conv and two linears; no exact zeros."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 12, 3), nn.Conv2d(12, 12, 3, groups=12), nn.Conv2d(12, 20, 1),
        nn.Flatten(), nn.Linear(20, 17), nn.Linear(17, 5))


# --------------------------------------------------------------------------- utilities

def test_sparsity_of():
    assert prune.sparsity_of(torch.tensor([0.0, 1.0, 0.0, -2.0])) == 0.5
    assert prune.sparsity_of(np.zeros((3, 3))) == 1.0
    assert prune.sparsity_of(torch.ones(2, 2)) == 0.0
    assert prune.sparsity_of(torch.empty(0)) == 0.0


def test_model_sparsity_counts_all_conv_and_linear_weights():
    net = small_net()
    assert prune.model_sparsity(net) == 0.0
    with torch.no_grad():
        net[0].weight.zero_()  # 216 of the weights
        net[2].bias.zero_()  # biases do not count
    total = sum(w.numel() for w in weights(net).values())
    assert prune.model_sparsity(net) == pytest.approx(216 / total)


# --------------------------------------------------------------------------- magnitude, layer scope

@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.77, 0.999, 1.0])
def test_layer_scope_exact_count(s):
    model = zoo.vgg16(input_size=32)
    before = weights(model)
    biases = [m.bias.clone() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    report = prune.prune_magnitude(model, s)
    after = weights(model)
    assert report.skipped == ["features.0"]
    assert [l.name for l in report] == [n for n in after if n != "features.0"]
    assert torch.equal(after["features.0"], before["features.0"])  # first conv stays dense
    for name, shape, sparsity in report:
        w = after[name]
        assert zeros(w) == round(s * w.numel()), name
        assert shape == tuple(w.shape) and sparsity == prune.sparsity_of(w)
        assert torch.equal(w[w != 0], before[name][w != 0])  # survivors untouched
    assert all(torch.equal(a, m.bias) for a, m in
               zip(biases, [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]))


def test_layer_scope_prunes_smallest_magnitudes():
    model = zoo.resnet18()
    before = weights(model)
    report = prune.prune_magnitude(model, 0.7)
    assert len(report) == 20  # 19 convs without the stem, plus fc
    for name, _, _ in report:
        w, orig = weights(model)[name], before[name].abs()
        assert orig[w == 0].max() <= orig[w != 0].min(), name


def test_ties_go_to_lowest_flat_index():
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.fill_(0.5)
        lin.weight[0, 0] = 0.1  # strictly the smallest
    prune.prune_magnitude(lin, 0.25)  # 6 zeros: [0, 0], then the first 5 tied values in C order
    expected = torch.full((4, 6), 0.5)
    expected.view(-1)[:6] = 0
    assert torch.equal(lin.weight, expected)


def test_existing_zeros_count_towards_target():
    lin = nn.Linear(10, 10)
    with torch.no_grad():
        lin.weight[:3] = 0  # 30 zeros already
    prune.prune_magnitude(lin, 0.5)
    assert zeros(lin.weight) == 50
    lin = nn.Linear(10, 10)
    with torch.no_grad():
        lin.weight[:8] = 0  # more than the target: kept, never un-pruned
    prune.prune_magnitude(lin, 0.5)
    assert zeros(lin.weight) == 80


# --------------------------------------------------------------------------- magnitude, global scope

@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_global_scope_one_threshold(name):
    s = 0.8
    model, _ = zoo.get_model(name)
    before = weights(model)
    report = prune.prune_magnitude(model, s, scope="global")
    after = weights(model)
    pruned = [l.name for l in report]
    total = sum(after[n].numel() for n in pruned)
    assert sum(zeros(after[n]) for n in pruned) == round(s * total)
    assert report.sparsity == pytest.approx(s, abs=1e-6)
    cut = max(before[n].abs()[after[n] == 0].max() for n in pruned if zeros(after[n]))
    kept = min(before[n].abs()[after[n] != 0].min() for n in pruned if zeros(after[n]) < after[n].numel())
    assert cut <= kept
    per_layer = [l.sparsity for l in report]
    assert max(per_layer) - min(per_layer) > 0.2  # global, not layer-wise
    for n in set(after) - set(pruned):  # stem and depthwise convs untouched
        assert torch.equal(after[n], before[n])


def test_global_ties_go_to_earlier_layers():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        for m in net:
            m.weight.fill_(1.0)
    prune.prune_magnitude(net, 0.75, scope="global")  # 24 of 32 tied weights
    assert zeros(net[0].weight) == 16 and zeros(net[1].weight) == 8
    assert torch.equal(net[1].weight.flatten()[8:], torch.ones(8))


# --------------------------------------------------------------------------- layer selection

@pytest.mark.parametrize("name", ["vgg16_cifar", "resnet18", "mobilenet_v2"])
def test_first_conv_dense_by_default(name):
    model, _ = zoo.get_model(name)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 3
    prune.prune_magnitude(model, 0.9)
    assert zeros(first.weight) == 0
    prune.prune_magnitude(model, 0.9, keep_first_conv_dense=False)
    assert zeros(first.weight) == round(0.9 * first.weight.numel())


@pytest.mark.parametrize("how", ["layer", "global", "blocks"])
def test_mobilenet_depthwise_stays_dense(how):
    model = zoo.mobilenet_v2()
    dw = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert len(dw) == 17
    report = (prune.prune_blocks(model, 0.9, (4, 4)) if how == "blocks"
              else prune.prune_magnitude(model, 0.9, scope=how))
    assert all(zeros(m.weight) == 0 for m in dw.values())
    assert set(dw) < set(report.skipped) and not set(dw) & {l.name for l in report}
    assert report.sparsity == pytest.approx(0.9, abs=1e-4)  # the target holds without them


def test_skip_grouped_false_prunes_depthwise():
    net = small_net()
    report = prune.prune_magnitude(net, 0.5, skip_grouped=False)
    assert "2" in [l.name for l in report] and zeros(net[2].weight) == round(0.5 * 108)


def test_include_linear_false():
    net = small_net()
    report = prune.prune_magnitude(net, 0.5, include_linear=False)
    assert [l.name for l in report] == ["1", "3"] and report.skipped == ["0", "2", "5", "6"]
    assert zeros(net[5].weight) == zeros(net[6].weight) == 0 and zeros(net[3].weight) == 120


# --------------------------------------------------------------------------- blocks

def check_blocks(orig, new, block, s, norm="l2"):
    """Every block of the O x (I*KH*KW) C-order matrix is all zero or untouched; the number of
    zero blocks is round(s * n_blocks); no zeroed block outranks a kept one."""
    bo, bi = block
    a, b = orig.reshape(orig.shape[0], -1), new.reshape(new.shape[0], -1)
    dropped, kept = [], []
    for r in range(0, a.shape[0], bo):
        for c in range(0, a.shape[1], bi):
            blk_a, blk_b = a[r:r + bo, c:c + bi], b[r:r + bo, c:c + bi]
            score = blk_a.pow(2).sum() if norm == "l2" else blk_a.abs().sum()
            if not blk_b.any():
                dropped.append(score)
            else:
                assert torch.equal(blk_a, blk_b), (r, c)
                kept.append(score)
    n = len(dropped) + len(kept)
    assert n == -(-a.shape[0] // bo) * -(-a.shape[1] // bi)
    assert len(dropped) == round(s * n)
    if dropped and kept:
        assert max(dropped) <= min(kept)
    return len(dropped)


@pytest.mark.parametrize("block", [(1, 1), (4, 1), (1, 4), (4, 4), (3, 5), (7, 2), (16, 16), (64, 100)])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9, 1.0])
def test_block_pruning_zeros_whole_blocks(block, s):
    net = small_net()
    before = weights(net)
    report = prune.prune_blocks(net, s, block)
    assert [l.name for l in report] == ["1", "3", "5", "6"]
    for name in ["1", "3", "5", "6"]:  # conv 12x72, conv 20x12, linear 17x20, linear 5x17
        check_blocks(before[name], weights(net)[name], block, s)
    assert torch.equal(net[0].weight, before["0"]) and torch.equal(net[2].weight, before["2"])


def test_block_pruning_uses_c_order_matrix_view():
    """Blocks of (1, 3) on a 1x3 conv kernel row are the columns (c, r, 0..2); a per-position
    ranking proves the grid is O x (I*KH*KW) and not, e.g., O x (KH*KW*I)."""
    conv = nn.Conv2d(2, 2, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1, 37, dtype=torch.float32).view(2, 2, 3, 3))
    prune.prune_blocks(conv, 7 / 12, (1, 3), keep_first_conv_dense=False)
    # 12 blocks, one per (o, c, kernel row), norms growing with the flat index: the 7 smallest
    # are the 6 of o=0 and (o=1, c=0, r=0).
    w = conv.weight
    assert not w[0].any() and not w[1, 0, 0].any()
    assert (w[1].flatten()[3:] != 0).all()


@pytest.mark.parametrize("block", [(4, 1), (2, 3), (16, 1)])
def test_blocks_match_bsr_format(block):
    net = small_net()
    prune.prune_blocks(net, 0.6, block)
    for m in (net[1], net[3], net[5]):
        n_blocks = -(-m.weight.shape[0] // block[0]) * -(-m.weight[0].numel() // block[1])
        assert to_bsr(m.weight, block).nnz_blocks == n_blocks - round(0.6 * n_blocks)


def test_block_norm_l1_vs_l2():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():  # row 0: L1 4, L2^2 4; row 1: L1 2.8, L2^2 6.28
        lin.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.5, 0.1, 0.1, -0.1]]))
    l2 = nn.Linear(4, 2, bias=False)
    l2.load_state_dict(lin.state_dict())
    prune.prune_blocks(lin, 0.5, (1, 4), norm="l1")
    prune.prune_blocks(l2, 0.5, (1, 4), norm="l2")
    assert not lin.weight[1].any() and lin.weight[0].all()
    assert not l2.weight[0].any() and l2.weight[1].all()


def test_block_pruning_channels_last_weight():
    conv = nn.Conv2d(6, 10, 3)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    orig = conv.weight.detach().clone()
    prune.prune_blocks(conv, 0.5, (4, 5), keep_first_conv_dense=False)
    check_blocks(orig, conv.weight.detach(), (4, 5), 0.5)


@settings(max_examples=60, deadline=None)
@given(o=st.integers(1, 20), i=st.integers(1, 9), k=st.sampled_from([1, 3]),
       bo=st.integers(1, 8), bi=st.integers(1, 12), s=st.floats(0, 1), norm=st.sampled_from(["l1", "l2"]),
       seed=st.integers(0, 2**16))
def test_block_pruning_property(o, i, k, bo, bi, s, norm, seed):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(i, o, k)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    orig = conv.weight.detach().clone()
    prune.prune_blocks(conv, s, (bo, bi), norm=norm, keep_first_conv_dense=False)
    check_blocks(orig, conv.weight.detach(), (bo, bi), s, norm)


@settings(max_examples=60, deadline=None)
@given(o=st.integers(1, 30), i=st.integers(1, 30), s=st.floats(0, 1), seed=st.integers(0, 2**16),
       levels=st.integers(1, 5))
def test_magnitude_property(o, i, s, seed, levels):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(i, o)
    with torch.no_grad():  # few distinct magnitudes: many ties, and signs
        lin.weight.copy_((torch.randint(1, levels + 1, (o, i), generator=g)
                          * (torch.randint(0, 2, (o, i), generator=g) * 2 - 1)).float())
    orig = lin.weight.detach().clone()
    prune.prune_magnitude(lin, s)
    w = lin.weight.detach()
    assert zeros(w) == round(s * w.numel())
    if 0 < zeros(w) < w.numel():
        assert orig.abs()[w == 0].max() <= orig.abs()[w != 0].min()
    # ties: among weights at the cut magnitude, pruned ones come first in C order
    if zeros(w):
        cut = orig.abs()[w == 0].max()
        tied = (orig.abs() == cut).flatten()
        pruned_tied = (w.flatten() == 0)[tied]
        assert torch.equal(pruned_tied, pruned_tied.sort(descending=True, stable=True).values)


# --------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("s", [-0.1, 1.0001, float("nan"), float("inf")])
def test_sparsity_out_of_range(s):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prune.prune_magnitude(small_net(), s)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prune.prune_blocks(small_net(), s)


@pytest.mark.parametrize("s", ["0.5", None, True, torch.tensor(0.5)])
def test_sparsity_not_a_number(s):
    with pytest.raises(TypeError, match="sparsity"):
        prune.prune_magnitude(small_net(), s)


@pytest.mark.parametrize("model", [None, "resnet18", torch.zeros(3, 3), [nn.Linear(2, 2)]])
def test_not_a_module(model):
    for fn in (lambda: prune.prune_magnitude(model, 0.5), lambda: prune.prune_blocks(model, 0.5),
               lambda: prune.model_sparsity(model)):
        with pytest.raises(TypeError, match="nn.Module"):
            fn()


@pytest.mark.parametrize("block", [4, (4,), (4, 1, 1), (0, 1), (1, -2), (1.5, 2), (2.0, 2), (True, 1),
                                   "41", None])
def test_bad_block(block):
    net = small_net()
    before = weights(net)
    with pytest.raises(ValueError, match="block"):
        prune.prune_blocks(net, 0.5, block)
    assert all(torch.equal(before[n], w) for n, w in weights(net).items())  # nothing touched


def test_bad_scope_and_norm():
    with pytest.raises(ValueError, match="scope"):
        prune.prune_magnitude(small_net(), 0.5, scope="network")
    with pytest.raises(ValueError, match="norm"):
        prune.prune_blocks(small_net(), 0.5, norm="linf")


def test_numpy_block_and_sparsity_accepted():
    net = small_net()
    prune.prune_blocks(net, np.float32(0.5), (np.int64(2), np.int64(2)))
    assert prune.model_sparsity(net) > 0.3


@pytest.mark.parametrize("mode,block", [("layer", None), ("global", None), ("block", None), ("block", (4, 1))])
def test_prune_model_dispatches_like_the_tools_option(mode, block):
    via_option, direct = small_net(), small_net()
    report = prune.prune_model(via_option, 0.5, mode, block)
    if mode == "block":
        prune.prune_blocks(direct, 0.5, block=block or (8, 1))
    else:
        prune.prune_magnitude(direct, 0.5, scope=mode)
    assert len(report) > 0
    for name, w in weights(via_option).items():
        assert torch.equal(w, weights(direct)[name]), name
