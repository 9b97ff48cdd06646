import pytest
import torch
from torch import nn

from fscnn_tvm import zoo

NUM_CLASSES = {"vgg16": 1000, "vgg16_cifar": 10, "resnet18": 1000, "resnet50": 1000, "mobilenet_v2": 1000}

# Parameter counts of the torchvision models of the same names (vgg16_cifar: VGG16 features
# 14,714,688 + Linear(512, 512) + Linear(512, 10)). Catches any off-by-one in the architectures.
TORCHVISION_PARAMS = {"vgg16": 138_357_544, "vgg16_cifar": 14_982_474, "resnet18": 11_689_512,
                      "resnet50": 25_557_032, "mobilenet_v2": 3_504_872}

_cache = {}


def built(name):
    """Each zoo model is built once per test session (VGG16-224 takes ~2 s)."""
    if name not in _cache:
        _cache[name] = zoo.get_model(name)
    return _cache[name]


def convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_forward_shape_and_eval_mode(name):
    model, shape = built(name)
    assert shape[0] == 1 and shape[1] == 3
    assert not any(m.training for m in model.modules())
    x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, NUM_CLASSES[name])
    assert torch.isfinite(y).all()
    assert not torch.allclose(y[0], y[1])  # output depends on the input


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_parameter_count_matches_torchvision(name):
    model, _ = built(name)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]


def test_vgg16_structure():
    for name, n_linear in (("vgg16", 3), ("vgg16_cifar", 2)):
        model, _ = built(name)
        cs = convs(model)
        assert len(cs) == 13 and all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in cs)
        assert [c.out_channels for c in cs] == [v for v in zoo.VGG16_CFG if v != "M"]
        assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
        assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 13 + n_linear - 1
        assert sum(isinstance(m, nn.Linear) for m in model.modules()) == n_linear
        assert not any(isinstance(m, (nn.Dropout, nn.BatchNorm2d)) for m in model.modules())
    bn = zoo.vgg16(input_size=32, batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 13
    # torchvision vgg16_bn has 138,365,992 = vgg16 + 8,448 BN affine parameters; same features here.
    assert sum(p.numel() for p in bn.parameters()) == TORCHVISION_PARAMS["vgg16_cifar"] + 8_448


def test_resnet_structure():
    r18, _ = built("resnet18")
    r50, _ = built("resnet50")
    assert len(convs(r18)) == 20 and len(convs(r50)) == 53  # 17 / 49 + 3 / 4 downsample convs
    # ResNet v1.5: in a strided bottleneck the 3x3 conv carries the stride, the first 1x1 does not.
    for layer in (r50.layer2, r50.layer3, r50.layer4):
        assert layer[0].conv1.stride == (1, 1) and layer[0].conv2.stride == (2, 2)
        assert layer[0].downsample[0].stride == (2, 2)
    assert r50.layer1[0].downsample is not None  # 64 -> 256 channels
    assert r18.layer1[0].downsample is None
    assert [b.downsample is not None for layer in (r18.layer2, r18.layer3) for b in layer] == [True, False] * 2


def test_mobilenet_v2_structure():
    model, _ = built("mobilenet_v2")
    dw = [c for c in convs(model) if c.groups > 1]
    assert len(dw) == 17
    assert all(c.groups == c.in_channels == c.out_channels and c.kernel_size == (3, 3) for c in dw)
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 35  # stem + 17 dw + 16 expand + head
    assert sum(m.use_res for m in model.modules() if isinstance(m, zoo.InvertedResidual)) == 10


def test_num_classes():
    assert zoo.resnet18(num_classes=7)(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    model, shape = zoo.get_model("mobilenet_v2", num_classes=5)
    assert model(torch.randn(shape)).shape == (1, 5)
    assert zoo.vgg16(input_size=32, num_classes=100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_get_model_input_size_override():
    model, shape = zoo.get_model("vgg16", input_size=32)  # the CIFAR head, 10 classes by default
    assert shape == (1, 3, 32, 32)
    assert model(torch.randn(shape)).shape == (1, 10)
    model, shape = zoo.get_model("vgg16_cifar", input_size=224, num_classes=3)
    assert shape == (1, 3, 224, 224)
    assert model.classifier[0].in_features == 25088 and model(torch.randn(shape)).shape == (1, 3)


@pytest.mark.parametrize("name,size,allowed", [("resnet18", 33, "224"), ("mobilenet_v2", 32, "224"),
                                               ("vgg16_cifar", 64, "32 or 224"), ("vgg16", 32.0, "32 or 224")])
def test_get_model_names_the_input_sizes_a_model_takes(name, size, allowed):
    with pytest.raises(ValueError, match=f"input_size: {name} takes {allowed}, got {size}"):
        zoo.get_model(name, input_size=size)
    assert zoo.get_model("resnet50", input_size=224)[1] == (1, 3, 224, 224)


def test_cli_compare_names_the_input_sizes(capsys):
    from fscnn_tvm.cli import main as cli
    assert cli(["compare", "--model", "resnet18", "--input-size", "33", "--no-per-layer"]) == 2
    assert "input_size: resnet18 takes 224, got 33" in capsys.readouterr().err


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError) as err:
        zoo.get_model("alexnet")
    assert all(name in str(err.value) for name in zoo.MODELS)


def test_vgg16_rejects_other_input_sizes():
    with pytest.raises(ValueError, match="input_size"):
        zoo.vgg16(input_size=64)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make", [zoo.resnet18, zoo.mobilenet_v2, lambda seed: zoo.vgg16(32, seed=seed),
                                  lambda seed: zoo.vgg16(32, batch_norm=True, seed=seed)])
def test_seed_reproducible(make):
    a, b, c = _state(make(seed=3)), _state(make(seed=3)), _state(make(seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    floats = [k for k in a if a[k].is_floating_point()]
    assert all(not torch.equal(a[k], c[k]) for k in floats)  # every weight and BN stat moves


def test_default_seed_is_zero():
    assert all(torch.equal(a, b) for a, b in zip(zoo.resnet18().state_dict().values(),
                                                 zoo.resnet18(seed=0).state_dict().values()))


def test_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    zoo.mobilenet_v2(seed=5)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_batchnorm_stats_are_nontrivial(name):
    model, shape = built(name)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert bn.running_mean.abs().max() > 1e-2
        assert (bn.running_var - 1).abs().max() > 1e-2 and (bn.running_var > 0).all()
        assert (bn.weight - 1).abs().max() > 1e-2 and bn.bias.abs().max() > 1e-2
    # A BN-folding bug that drops the running stats changes the output a lot.
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x)
        saved = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
        y_default = model(x)
        for bn, (mean, var) in zip(bns, saved):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        assert torch.equal(model(x), y)
    assert (y - y_default).abs().max() > 0.1 * y.abs().max()


@pytest.mark.parametrize("name", ["vgg16_cifar", "resnet18", "mobilenet_v2"])
def test_torch_export(name):
    model, shape = built(name)
    x = torch.randn(shape)
    prog = torch.export.export(model, (x,))
    ops = {str(n.target) for n in prog.graph.nodes if n.op == "call_function"}
    assert not any("dropout" in op or op.endswith("_.default") for op in ops), ops  # no dropout, no in-place
    with torch.no_grad():
        torch.testing.assert_close(prog.module()(x), model(x))
