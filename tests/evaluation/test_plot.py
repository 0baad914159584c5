"""`visor-vllm plot` renders every picture to a PNG, from inputs shaped as the producers write
them, and refuses the wrong file with a message (exit 2), never a traceback."""

from __future__ import annotations

import json

import pytest

from visor_vllm.cli import main

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"

SEARCH = {  # visor_vllm.training.search.search() output, trimmed to two configurations
    "configs": [{"sa_layers": [0], "sa_layers_1based": [1], "flops_vs_dense": 0.44, "accuracy": 0.68,
                 "families": {"count": 0.6, "vsame": 0.7}, "groups": {}},
                {"sa_layers": [0, 2], "sa_layers_1based": [1, 3], "flops_vs_dense": 0.53,
                 "accuracy": 0.70, "families": {"count": 0.62, "vsame": 0.78}, "groups": {}}],
    "heatmap": {"rows": [[1], [1, 3]], "columns": ["count", "vsame"],
                "accuracy": [[0.6, 0.7], [0.62, 0.78]]},
    "viable": [[0], [0, 2]],
}
PASSES = [  # visor_vllm.evaluation.served.evaluate_served() passes
    {"budget": "min", "accuracy": 0.677, "flops_vs_dense": 0.443, "groups": {}, "families": {},
     "sa_layers_histogram": {"count": {"1": 10}, "vsame": {"1": 10}}},
    {"budget": "auto", "accuracy": 0.698, "flops_vs_dense": 0.455, "groups": {}, "families": {},
     "sa_layers_histogram": {"count": {"1": 9, "2": 1}, "vsame": {"1": 4, "2": 6}}},
]
BENCH = {"ratios": [{"budget": "min", "concurrency": 1, "ttft": 0.6, "itl": 0.9, "itl_p50": 0.87,
                     "req_per_s": 1.4, "tok_per_s": 1.4, "kv_capacity": 1.49}]}


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("kind,data", [
    ("heatmap", SEARCH), ("routing", {"passes": PASSES}), ("accuracy", {"passes": PASSES}),
    ("accuracy", SEARCH), ("bench", BENCH),
    # a recipe report.json: served passes and the dense server's accuracy
    ("accuracy", {"served": {"passes": PASSES, "dense": {"accuracy": 0.698}}}),
    ("routing", {"served": {"passes": PASSES}}),
])
def test_each_picture_renders_a_png(tmp_path, kind, data):
    out = tmp_path / f"{kind}.png"
    assert main(["plot", kind, _write(tmp_path, "in.json", data), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 5000


@pytest.mark.parametrize("preset", ["tiny", "visor-0.5b"])
def test_flops_picture_from_a_preset(tmp_path, preset):
    out = tmp_path / "flops.png"
    assert main(["plot", "flops", "--preset", preset, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG


def test_flops_figure_draws_dense_above_every_configuration():
    from visor_vllm.evaluation.plot import flops_figure
    from visor_vllm.model.config import get_preset

    cfg = get_preset("visor-0.5b")
    lines = flops_figure(cfg, points=5).axes[0].get_lines()
    assert len(lines) == 1 + len(cfg.sa_configs)
    dense = lines[0].get_ydata()
    assert all((dense[1:] > line.get_ydata()[1:]).all() for line in lines[1:])


@pytest.mark.parametrize("kind,data,message", [
    ("heatmap", {"passes": PASSES}, "visor-vllm search"),
    ("routing", SEARCH, "passes"),
    ("routing", {"passes": [{"budget": "max", "sa_layers_histogram": {}}]}, "auto"),
    ("bench", SEARCH, "bench_vs_llava"),
    ("accuracy", [1, 2], "JSON object"),
])
def test_wrong_input_is_exit_2_with_a_message(tmp_path, capsys, kind, data, message):
    assert main(["plot", kind, _write(tmp_path, "in.json", data), "--out",
                 str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_missing_file_is_exit_2(tmp_path, capsys):
    assert main(["plot", "heatmap", str(tmp_path / "absent.json"), "--out", str(tmp_path / "x.png")]) == 2
    assert "absent.json" in capsys.readouterr().err
