"""Comparison runs on a small model: every field, every layer, loud disagreement, clear errors."""
import json

import numpy as np
import pytest
import torch

from fscnn_tvm import bench, compare, layer, prune
from fscnn_tvm.cli import main as cli


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=4), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU6(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10)).eval()
    prune.prune_magnitude(model, 0.8, keep_first_conv_dense=False)
    path = tmp_path_factory.mktemp("prog") / "small.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), str(path))
    return str(path)


def _result(sparsities):
    layers = [{"layer": f"conv{i}", "kind": "conv2d", "shape": "8x8x3x3", "format": fmt, "speedup": speedup}
              for i, (fmt, speedup) in enumerate([("csr", 2.0), ("dense", 1.0), ("bsr 4x1", 0.5)])]
    return {"model": "m", "machine": {"threads": 2},
            "points": [{"sparsity": s, "layers": layers, "end_to_end": {"speedup": 1.5}} for s in sparsities]}


def test_one_sparsity_is_plotted_as_a_bar_per_layer(tmp_path):
    fig = compare.plot(_result([0.9]), str(tmp_path / "one.png"))
    ax = fig.axes[0]
    # Three layers and end to end, each a bar from the 1x line to its speedup.
    assert [(p.get_y(), round(p.get_y() + p.get_height(), 2)) for p in ax.patches] == \
        [(1.0, 2.0), (1.0, 1.0), (1.0, 0.5), (1.0, 1.5)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv0", "conv1", "conv2", "end to end"]
    assert (tmp_path / "one.png").stat().st_size > 0
    fig = compare.plot(_result([0.5, 0.9]), str(tmp_path / "two.png"))  # several: lines, no bars
    assert not fig.axes[0].patches and len(fig.axes[0].lines) == 3  # layer group, end to end, 1x


def test_json_markdown_plot_cover_every_layer(program, tmp_path, caplog):
    out = tmp_path / "r.json"
    with caplog.at_level("WARNING", logger="fscnn_tvm"):
        assert cli(["compare", "--program", program, "--sparsity", "0.8", "--budget", "0.05", "--no-measure",
                    "--json", str(out), "--markdown", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png")]) == 0
    # One warning about kernels without a record (the dense import has no sparse kernel), with the tune command.
    [untuned] = [r.getMessage() for r in caplog.records if "have no tuned record" in r.getMessage()]
    assert f"fscnn-tvm tune --program {program} --no-measure --log tuning_logs/small" in untuned
    result = json.loads(out.read_text())
    for key in ("model", "batch", "machine", "points", "break_even_end_to_end", "break_even_per_layer"):
        assert key in result
    for key in ("cpu", "isa", "cores", "threads", "tvm", "torch"):
        assert key in result["machine"]
    point = result["points"][0]
    e2e = point["end_to_end"]
    for engine in compare.ENGINES:
        assert e2e[f"{engine}_ms"] > 0 and e2e[f"{engine}_min_ms"] <= e2e[f"{engine}_ms"] <= e2e[f"{engine}_max_ms"]
    assert e2e["speedup"] == pytest.approx(e2e["best_dense_ms"] / e2e["tvm_sparse_ms"])
    layers = [r["layer"] for r in point["layers"]]
    assert len(layers) == 5  # four convs (one grouped, one depthwise with ReLU6) and the linear
    formats = {r["layer"]: r["format"] for r in point["layers"]}
    assert sum(f == "dense" for f in formats.values()) == 2  # the grouped and depthwise convs stay dense
    assert "End to end" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_a_list_of_batch_sizes_reports_images_per_second(program, tmp_path, capsys):
    assert cli(["compare", "--program", program, "--sparsity", "0.8", "--budget", "0.02", "--no-measure",
                "--no-per-layer", "--batch", "1,2", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "End to end by batch size" in out and "sparse_images_per_s" in out
    for batch in (1, 2):
        result = json.loads((tmp_path / f"small_b{batch}.json").read_text())
        e2e = result["points"][0]["end_to_end"]
        assert result["batch"] == batch
        assert e2e["sparse_images_per_s"] == pytest.approx(batch * 1e3 / e2e["tvm_sparse_ms"])
        assert e2e["best_dense_images_per_s"] == pytest.approx(batch * 1e3 / e2e["best_dense_ms"])


def test_disagreeing_engines_stop_before_timing(program, monkeypatch):
    real_call = layer.SparseLayer.__call__
    monkeypatch.setattr(layer.SparseLayer, "__call__", lambda self, x: real_call(self, x) + 1.0)
    with pytest.raises(bench.OutputMismatch, match="tvm_sparse"):
        compare.compare_model(program=program, sparsities=[0.8], budget_s=0.01, measure=False)


def test_check_close_catches_a_wrong_result():
    ref = np.ones((2, 3), np.float32)
    assert bench.check_close("x", ref + 1e-6, ref) < 1e-4
    with pytest.raises(bench.OutputMismatch, match="relative error"):
        bench.check_close("x", ref * 1.01, ref)
    with pytest.raises(bench.OutputMismatch, match="shape"):
        bench.check_close("x", ref[:1], ref)


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "1.5"], "sparsity must be in"),
    (["--sparsity", "abc"], "sparsity list"),
    (["--model", "alexnet"], "unknown model"),
    (["--tuning-log", "/nonexistent/log"], "tuning log"),
    (["--batch", "1,0"], "batch sizes must be positive"),
    (["--batch", "1,x"], "batch list"),
    (["--batch", "1,2", "--json", "r.json"], "with several batch sizes"),
])
def test_bad_arguments_give_clear_errors(argv, message, capsys):
    try:
        code = cli(["compare", *argv, "--no-per-layer"])
    except SystemExit as exc:  # argparse rejects before running
        code = exc.code
    assert code != 0
    assert message in capsys.readouterr().err


def test_layer_command_checks_and_times_every_engine(tmp_path, capsys):
    out = tmp_path / "layer.json"
    assert cli(["layer", "--in-ch", "8", "--out-ch", "12", "--size", "10", "--stride", "2", "--budget", "0.02",
                "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    engines = [r["engine"] for r in result["rows"]]
    assert engines[0] == "pytorch dense" and "tvm sparse csr" in engines and "tvm dense (ours)" in engines
    assert all(r["median_ms"] > 0 and r["runs"] >= 10 for r in result["rows"])
    assert "vs_best_dense" in capsys.readouterr().out


def test_bench_peers_refuses_an_unknown_model_before_running_any_case(tmp_path):
    """An unknown --models name is an error up front (it used to crash after every layer case
    had run, writing nothing); 'none' means no model."""
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "bench_peers.py")
    done = subprocess.run([sys.executable, script, "--models", "resnet50,nonsense", "--layers", "none",
                           "--no-deepsparse", "--no-onnxruntime"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown nonsense" in done.stderr and "(or 'none')" in done.stderr
    none = subprocess.run([sys.executable, script, "--models", "none", "--layers", "none", "--no-deepsparse",
                           "--no-onnxruntime", "--out", str(tmp_path / "peers")], capture_output=True, text=True,
                          timeout=120)
    assert none.returncode == 0, none.stderr
