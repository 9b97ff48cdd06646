"""Batch chunks: where a batched model is cut for chunked execution (one live tensor, no chain
split, nothing that mixes images before it), the chunk size, and whole imports that run their
segments in chunks and still match PyTorch."""
import numpy as np
import pytest
import torch

import fscnn_tvm
from fscnn_tvm import chains, chunks, importer, prune
from fscnn_tvm.torch_export import export_torch


class Block(torch.nn.Module):
    """conv-bn-relu twice with a residual add: a cut may follow the add, not a conv inside."""

    def __init__(self, c):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + x)


class Mixing(torch.nn.Module):
    """A residual net whose middle subtracts the batch mean: images depend on each other there."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU())
        self.block1, self.block2 = Block(16), Block(16)
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5))

    def forward(self, x):
        x = self.block1(self.stem(x))
        x = x - x.mean(0, keepdim=True)
        return self.head(self.block2(x))


def _main(model, x):
    main = importer._translate(export_torch(model, (x,)))["main"]
    bindings, _, absorbed = chains.find_chains(main)
    return main, bindings, absorbed


def _pruned(model):
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    prune.prune_magnitude(model, 0.8, keep_first_conv_dense=False)
    return model.eval()


def _check_cuts(main, bindings, absorbed, segments):
    """Each segment ends where one tensor is live, outside any chain: nothing it defines but its
    last var (and no model input) is read after it."""
    for seg in segments:
        assert bindings[seg.end].var not in absorbed
        for b in bindings[seg.end + 1:]:
            used = set(chunks.free_vars(b.value))
            assert not used & {x.var for x in bindings[: seg.end]} and not used & set(main.params)


def test_segments_end_where_one_tensor_is_live_and_before_an_op_that_mixes_images():
    model = _pruned(Mixing())
    main, bindings, absorbed = _main(model, torch.randn(4, 3, 16, 16))
    segments = chunks.plan(main, absorbed, cache_bytes=1)  # every activation exceeds the cache
    assert [s.chunk for s in segments] == [1] and segments[0].start == 0
    mean = next(i for i, b in enumerate(bindings) if chunks._op(b.value) == "relax.mean")
    assert segments[0].end < mean
    assert chunks._op(bindings[segments[0].end].value) == "relax.nn.relu"  # after block1's add
    _check_cuts(main, bindings, absorbed, segments)


def test_each_segment_takes_as_many_images_as_its_activations_fit():
    model = _pruned(torch.nn.Sequential(Block(8), torch.nn.MaxPool2d(2), Block(8), torch.nn.MaxPool2d(2), Block(8)))
    main, bindings, absorbed = _main(model, torch.randn(8, 8, 16, 16))
    image = 8 * 16 * 16 * 4  # bytes of one image's activation before the first pool
    pools = [i for i, b in enumerate(bindings) if chunks._op(b.value) == "relax.nn.max_pool2d"]
    # 16x16 maps: 2 images fit; 8x8: 8 (the whole batch: no segment); 4x4 too. Each pool is the
    # last op of the conv chain before it (its ReLU absorbed), so the cuts fall after the pools.
    segments = chunks.plan(main, absorbed, cache_bytes=2 * image)
    assert [(s.start, s.end, s.chunk) for s in segments] == [(0, pools[0], 2)]
    # 16x16: 1 image; 8x8 (a quarter of the bytes): 2; 4x4: 8
    segments = chunks.plan(main, absorbed, cache_bytes=image // 2)
    assert [(s.start, s.chunk) for s in segments] == [(0, 1), (pools[0] + 1, 2)] and segments[1].end == pools[1]
    _check_cuts(main, bindings, absorbed, segments)
    assert chunks.plan(main, absorbed, cache_bytes=8 * image) == []  # everything fits: no chunks
    assert chunks.plan(*_main(model, torch.randn(1, 8, 16, 16))[::2], cache_bytes=1) == []  # batch 1


def test_a_chunk_holds_at_least_one_image_per_core():
    """With ``least`` (the cores) the chunks that would hold fewer images take the smallest
    divisor of the batch from there on; where that is the whole batch, nothing is chunked."""
    model = _pruned(torch.nn.Sequential(Block(8), torch.nn.MaxPool2d(2), Block(8), torch.nn.MaxPool2d(2), Block(8)))
    main, bindings, absorbed = _main(model, torch.randn(8, 8, 16, 16))
    image = 8 * 16 * 16 * 4
    pools = [i for i, b in enumerate(bindings) if chunks._op(b.value) == "relax.nn.max_pool2d"]
    segments = chunks.plan(main, absorbed, cache_bytes=image // 2, least=2)  # (1 and 2 images: both 2)
    assert [(s.start, s.end, s.chunk) for s in segments] == [(0, pools[1], 2)]
    _check_cuts(main, bindings, absorbed, segments)
    assert [s.chunk for s in chunks.plan(main, absorbed, cache_bytes=image // 2, least=3)] == [4]
    main3, _, absorbed3 = _main(model, torch.randn(3, 8, 16, 16))
    assert chunks.plan(main3, absorbed3, cache_bytes=1, least=2) == []  # (3 images: the smallest divisor from 2 is 3)


def test_a_flatten_that_keeps_the_batch_may_be_chunked_and_one_that_does_not_ends_the_segments():
    class Flat(torch.nn.Module):
        def __init__(self, keep):
            super().__init__()
            self.conv, self.keep = torch.nn.Conv2d(3, 4, 3, padding=1), keep

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return (y.flatten(1) if self.keep else y.reshape(1, -1)) * 2.0

    x = torch.randn(2, 3, 8, 8)
    main, bindings, absorbed = _main(Flat(True).eval(), x)
    [segment] = chunks.plan(main, absorbed, cache_bytes=1)
    assert chunks._op(bindings[segment.end].value) == "relax.multiply"  # the whole model: its last op
    main, bindings, absorbed = _main(Flat(False).eval(), x)
    reshape = next(i for i, b in enumerate(bindings) if chunks._op(b.value) == "relax.reshape"
                   and len(b.var.ty.shape) == 2)  # not the bias's (1, 4, 1, 1)
    assert chunks.plan(main, absorbed, cache_bytes=1)[-1].end < reshape


def _import_and_check(model, x, **kwargs):
    imported = fscnn_tvm.import_torch(model, (x,), measure=False, **kwargs)
    compiled = fscnn_tvm.compile(imported)
    with torch.no_grad():
        ref = model(x).numpy()
    out = compiled(x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
    return imported


# Activations of 16 channels at 128x128, batch 6: 6 MiB, over the L2 of any two cores.
BIG = (6, 3, 128, 128)


def test_a_batched_import_runs_its_segments_in_chunks_and_matches_pytorch():
    torch.manual_seed(1)
    model = _pruned(torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), Block(16), torch.nn.MaxPool2d(4),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)))
    imported = _import_and_check(model, torch.randn(*BIG))
    assert any("at a time" in n for n in imported.notes)
    assert any(gv.name_hint.startswith("chunk") for gv in imported.mod.functions)
    # Each chunk's input is a view of the batch's (its images are one block): not a copy.
    main = str(imported.mod["main"])
    assert "R.memory.view" in main and "strided_slice" not in main
    # ... and each chunk's last kernel writes its images into the batch's tensor: no concat.
    assert "concat" not in main and "R.builtin.alloc_tensor" in main
    assert "R.call_tir_inplace" in str(imported.mod["chunk0"])
    assert imported.input_shapes == [BIG]
    assert [r.name for r in imported.report] == ["0", "2.a.0", "2.b.0", "4", "8"]  # graph order, whoever emits
    # The segments' layers are built for their chunk, the rest for the batch.
    batches = {r.name: r.x_shape[0] for r in imported.report}
    assert min(batches.values()) < 6 and batches[imported.report[-1].name] == 6


def test_a_segment_that_ends_in_an_op_of_tvms_copies_its_images_into_the_batch():
    """The chunked segment ends with a sigmoid (TVM's op, not a kernel of ours that could write
    in place): each chunk copies its output into the batch tensor; the result matches."""
    torch.manual_seed(3)
    model = _pruned(torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Sigmoid(), torch.nn.MaxPool2d(4),
        torch.nn.Conv2d(16, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten()))
    imported = _import_and_check(model, torch.randn(*BIG))
    assert any("at a time" in n for n in imported.notes)
    names = [gv.name_hint for gv in imported.mod.functions]
    assert any(n.startswith("copy_into") for n in names) and "concat" not in str(imported.mod["main"])


def test_images_that_depend_on_each_other_are_never_chunked_across():
    model = _pruned(Mixing())
    imported = _import_and_check(model, torch.randn(*BIG))
    assert any("at a time" in n for n in imported.notes)
    batches = {r.name: r.x_shape[0] for r in imported.report}
    assert batches["stem.0"] < 6 and batches["block2.a.0"] == batches["block2.b.0"] == 6


def test_a_model_that_runs_at_its_batch_only_keeps_the_batch_whole():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x)).view(6, 16, -1).sum(-1)  # a reshape to the constant batch

    imported = _import_and_check(_pruned(Fixed()), torch.randn(*BIG))
    assert not any("at a time" in n for n in imported.notes)


@pytest.mark.parametrize("dynamic", [True, False])
def test_dynamic_batch_and_batch_one_imports_have_no_chunks(dynamic):
    model = _pruned(torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU()))
    x = torch.randn(*BIG) if dynamic else torch.randn(1, *BIG[1:])
    imported = fscnn_tvm.import_torch(model, (x,), measure=False, dynamic_batch=(1, 8) if dynamic else None)
    assert not any(gv.name_hint.startswith("chunk") for gv in imported.mod.functions)


def test_the_kernels_built_ahead_are_the_ones_the_sparse_dense_choice_races(monkeypatch):
    """Built two at a time before the races: each raced conv's kernels, at the batch it runs
    (its chunk's inside a segment), and nothing else. (Timings stubbed: tests do not assert speed.)"""
    from fscnn_tvm import pick
    built, raced = [], []
    monkeypatch.setattr(pick, "prebuild", lambda convs, target: built.extend(convs))
    monkeypatch.setattr(pick, "time_conv", lambda *a, **k: raced.append(a[:6] + (k,)) or (1.0, 2.0))  # (no target)
    torch.manual_seed(1)
    model = _pruned(torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), Block(16), torch.nn.MaxPool2d(4),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten()))
    imported = fscnn_tvm.import_torch(model, (torch.randn(*BIG),))
    assert any("at a time" in n for n in imported.notes) and len(raced) == 4

    def key(conv):
        weight, x_shape, bias, activation, fmt, block, conv_args = conv
        return weight.tobytes(), tuple(x_shape), activation, fmt, block, str(conv_args)
    assert sorted(map(key, built)) == sorted(map(key, raced))
    assert {c[1][0] for c in raced} == {r.x_shape[0] for r in imported.report} and min(c[1][0] for c in raced) < 6


def _reshapes(func):
    """(reshape bindings whose input is itself a reshape's result, whether the function returns
    a reshape's result) of a Relax function."""
    from tvm import relax
    bound = {b.var: b.value for blk in func.body.blocks for b in blk.bindings}

    def is_reshape(var):
        value = bound.get(var)
        return isinstance(value, relax.Call) and getattr(value.op, "name", None) == "relax.reshape"
    chained = [v for v, value in bound.items() if is_reshape(v) and is_reshape(value.args[0])]
    result = func.body.body
    return chained, is_reshape(bound.get(result, result)) if isinstance(result, relax.Var) else False


def test_kernel_views_are_one_reshape_and_chunks_return_what_their_last_kernel_wrote():
    """Pointwise kernels view their input as a flat image: the layer between two of them is one
    reshape of the first kernel's output (two chained reshapes fuse into a copy), and a chunk
    returns its last kernel's output as written (a reshape returned from a function is a copy
    too); main views the concatenated batch as the model's shape."""
    from tvm import relax
    torch.manual_seed(2)
    model = _pruned(torch.nn.Sequential(  # 28x28 maps: pointwise kernels view them as one 784-pixel row
        torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 256, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(256, 256, 1), torch.nn.ReLU(), torch.nn.Conv2d(256, 64, 1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)))
    imported = _import_and_check(model, torch.randn(6, 3, 28, 28))
    chunk_functions = [gv for gv in imported.mod.functions if gv.name_hint.startswith("chunk")]
    assert chunk_functions
    for gv, func in imported.mod.functions.items():
        if isinstance(func, relax.Function):
            chained, returns_reshape = _reshapes(func)
            assert not chained, gv.name_hint
            assert not (returns_reshape and gv in chunk_functions), gv.name_hint


def test_no_cut_falls_on_an_expansion_computed_inside_the_depthwise_kernel():
    """MobileNet's blocks: the expansion's output, the largest tensor, is never materialised when
    the depthwise kernel computes it, so no segment may end there (the next segment's depthwise
    conv would then read the whole batch's expanded tensor from memory); a batched import still
    fuses every expansion and matches PyTorch."""
    def block(c, hidden, stride):
        return [torch.nn.Conv2d(c, hidden, 1, bias=False), torch.nn.BatchNorm2d(hidden), torch.nn.ReLU6(),
                torch.nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), torch.nn.BatchNorm2d(hidden),
                torch.nn.ReLU6(), torch.nn.Conv2d(hidden, c, 1)]
    model = _pruned(torch.nn.Sequential(*block(8, 48, 1), *block(8, 48, 2), *block(8, 48, 1)))
    x = torch.randn(4, 8, 24, 24)
    main, bindings, absorbed = _main(model, x)
    chains_ = chains.find_chains(main)[1]
    fused = {e.last_var for e in chains.fused_expansions(bindings, chains_, 0, len(bindings), main.body.body).values()}
    assert len(fused) == 3
    image = 48 * 24 * 24 * 4  # one image's expanded tensor at 24x24
    segments = chunks.plan(main, absorbed | fused, cache_bytes=image // 2)
    assert segments and not any(bindings[s.end].var in fused for s in segments)
    assert any(bindings[s.end].var in fused for s in chunks.plan(main, absorbed, cache_bytes=image // 2))
    imported = fscnn_tvm.import_torch(model, (x,), measure=False)
    assert sum(r.fmt.endswith("(fused)") for r in imported.report) == 3
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
