"""Every zoo model, pruned to 90 %, imports, compiles and matches PyTorch (batch 1, and 2 for two);
and the CLI does the same from a zoo name or a saved program."""
import numpy as np
import pytest
import torch

import fscnn_tvm
from fscnn_tvm import prune, zoo
from fscnn_tvm.cli import main as cli


pytestmark = pytest.mark.slow

# Batch 2 on the small models only: the batch path is the same code for every model, and the
# large ones cost a minute each.
CASES = [(name, 1) for name in sorted(zoo.MODELS)] + [("resnet18", 2), ("vgg16_cifar", 2)]


@pytest.mark.parametrize("name,batch", CASES)
def test_zoo_model_pruned_to_90_matches_pytorch(name, batch):
    model, shape = zoo.get_model(name)
    pruned = prune.prune_magnitude(model, 0.9)
    x = torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(batch))
    imported = fscnn_tvm.import_torch(model, (x,), measure=False)
    rows = {r.name: r for r in imported.report}
    assert len(rows) == len(pruned.layers) + len(pruned.skipped)  # every conv/linear is reported
    for layer in pruned.layers:  # every pruned layer went sparse...
        assert rows[layer.name].rewritten, (layer.name, rows[layer.name].reason)
    for name_ in pruned.skipped:  # ...and every layer left dense says why
        assert not rows[name_].rewritten and rows[name_].reason
    with torch.no_grad():
        ref = model(x).numpy()
    out = fscnn_tvm.compile(imported)(x)
    # The zoo's random VGG is nearly blind to its input, so compare against the output's spread too.
    scale = max(np.abs(ref).max(), 1.0)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * scale)


def test_cli_import_zoo_and_program(tmp_path, capsys):
    lib = tmp_path / "v.so"
    assert cli(["import", "--model", "vgg16_cifar", "--sparsity", "0.9", "--time", "0", "--no-measure",
                "--out", str(lib)]) == 0
    out = capsys.readouterr().out
    assert "features.2" in out and "14 of 15 conv/linear layers run sparse" in out
    assert "output matches PyTorch" in out and lib.exists()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    prune.prune_magnitude(model, 0.8, keep_first_conv_dense=False)
    program = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 9, 9),)), str(program))
    assert cli(["import", "--program", str(program), "--time", "0", "--no-measure", "--out", str(tmp_path / "m.so")]) == 0
    assert "2 of 2 conv/linear layers run sparse" in capsys.readouterr().out
    assert cli(["import", "--program", str(tmp_path / "missing.pt2"), "--time", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
