"""`visor-vllm search`, `label` and `train-router` as a user chains them, on a tiny checkpoint.

Deterministic: the same command on the same checkpoint and data writes the same JSON, and the
routed checkpoint's router reproduces what train-router reports.
"""

import json

from safetensors.torch import load_file

from visor_vllm import cli
from visor_vllm.model.config import VisorConfig


def test_search_label_train_router_chain(tmp_path, visor_ckpt_synth, synth_data):
    val = str(synth_data / "val.jsonl")
    viable_dir = tmp_path / "viable"
    assert cli.main(["search", str(visor_ckpt_synth), val, "--out", str(tmp_path / "s.json"),
                     "--write", str(viable_dir)]) == 0
    found = json.loads((tmp_path / "s.json").read_text())
    assert VisorConfig.from_pretrained(str(viable_dir)).sa_configs == found["viable"]
    assert found["viable"][0] == [0] and found["viable"][-1] == [0, 2, 4, 6]

    for name in ("l1.json", "l2.json"):
        assert cli.main(["label", str(viable_dir), val, "--out", str(tmp_path / name)]) == 0
    first = json.loads((tmp_path / "l1.json").read_text())
    assert first == json.loads((tmp_path / "l2.json").read_text())  # deterministic
    assert len(first["per_sample"]["family"]) == len(first["samples"]) == 16
    assert set(first["per_sample"]["oracle"]) <= set(range(len(found["viable"])))

    for out in ("r1", "r2"):
        assert cli.main(["train-router", str(viable_dir), str(tmp_path / "l1.json"),
                         "--out", str(tmp_path / out), "--steps", "50"]) == 0
    a = load_file(str(tmp_path / "r1" / "model.safetensors"))
    b = load_file(str(tmp_path / "r2" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)  # same seed, same router
    base = load_file(str(viable_dir / "model.safetensors"))
    changed = {k for k in a if not (a[k] == base[k]).all()}
    assert changed and all(k.startswith("router.") for k in changed)  # only the router moved


def test_cli_errors_are_exit_2(tmp_path, visor_ckpt_synth, capsys):
    assert cli.main(["label", str(visor_ckpt_synth), str(tmp_path / "missing.jsonl"),
                     "--out", str(tmp_path / "l.json")]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert cli.main(["train-router", str(visor_ckpt_synth), str(tmp_path / "bad.json"),
                     "--out", str(tmp_path / "r")]) == 2
