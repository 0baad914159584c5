"""Analytic FLOP counts: hand-computed values, dense equivalence, monotonicity and the CLI."""

import importlib.util
import json

import pytest

from visor_vllm import cli
from visor_vllm.model import flops
from visor_vllm.model.config import PAPER_SA_CONFIGS_0_5B, VisorConfig, get_preset, preset_tiny

CHAIN = [[1, 4], [1, 4, 7], [1, 4, 7, 16], [1, 4, 7, 10, 16], [1, 4, 7, 10, 16, 22],
         [1, 4, 7, 10, 16, 19, 22]]


@pytest.fixture(scope="module")
def cfg05():
    return get_preset("visor-0.5b")


@pytest.fixture(scope="module")
def tiny():
    return preset_tiny()


def idx(numbers):
    return [n - 1 for n in numbers]


# -- tiny preset by hand: d=128, H=4, Hkv=2, dh=32, f=256, conv k=7, router r=32, C=4 ------------
# layers: 0 self, 1 cross, 2 text, 3 self, 4 cross, 5 self.  Nv=16, Nt=8, S={0,3}, R=1.
LINEAR_PER_TOKEN = 2 * (128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 256)  # 294912
ATTN_PER_QK = 4 * 4 * 32                                                      # 512
TEXT_LAYER = 294912 * 8 + 512 * 8 * 8                   # 2392064: layer on Nt=8, Nk=8
SA_LAYER = 294912 * 24 + 512 * 24 * 24                  # 7372800: layer on Nv+Nt=24
CROSS_MODULE = (2 * 128 * 7 * 16        # conv     28672
                + 2 * 8 * 128 * 128     # q_proj  262144
                + 2 * 16 * 2 * 128 * 64  # k,v    524288
                + 4 * 8 * 16 * 4 * 32   # attn     65536
                + 2 * 8 * 128 * 128)    # o_proj  262144  -> 1142784
ROUTER = 2 * (128 * 32 + 32 * 4)        # 8448


def test_tiny_hand_computed_constants():
    assert (LINEAR_PER_TOKEN, TEXT_LAYER, SA_LAYER, CROSS_MODULE, ROUTER) == (
        294912, 2392064, 7372800, 1142784, 8448)


def test_tiny_prefill_by_hand(tiny):
    # self(active) + cross + text + self(active) + cross + self(inactive) + router
    expected = SA_LAYER + (TEXT_LAYER + CROSS_MODULE) + TEXT_LAYER + SA_LAYER \
        + (TEXT_LAYER + CROSS_MODULE) + TEXT_LAYER + ROUTER
    assert expected == 26607872
    assert flops.prefill_flops(tiny, 16, 8, [0, 3]) == 26607872
    assert flops.prefill_flops(tiny, 16, 8, [0, 3], routed=False) == 26607872 - ROUTER
    assert flops.prefill_flops(tiny, 16, 8, [0, 3], n_routing=2) == 26607872 + ROUTER
    # one layer of each kind, isolated by differences
    assert flops.prefill_flops(tiny, 16, 8, [0, 3, 5]) - flops.prefill_flops(tiny, 16, 8, [0, 3]) \
        == SA_LAYER - TEXT_LAYER
    assert flops.prefill_flops(tiny, 0, 8, [0, 3]) == 6 * TEXT_LAYER  # text-only: no cross, no router


def test_tiny_decode_step_by_hand(tiny):
    # Nv=16, context c=9, S={0,3}: 6 layers of projections+MLP on one token,
    # attention Nk=9 on layers 1,2,4,5, Nk=25 on SA layers 0,3, cross q/o + attention over Nv.
    expected = 6 * 294912 + 4 * 512 * 9 + 2 * 512 * 25 + 2 * (2 * 2 * 128 * 128 + 512 * 16)
    assert expected == 1960960
    assert flops.decode_step_flops(tiny, 16, 9, [0, 3]) == 1960960
    assert flops.dense_decode_step_flops(tiny, 16, 9) == 6 * (294912 + 512 * 25) == 1846272
    assert flops.dense_prefill_flops(tiny, 16, 8) == 6 * SA_LAYER


def test_tiny_vision_encoder_by_hand(tiny):
    # P=(32//8)^2=16, dv=64, fv=128, 2 layers, d=128
    per_crop = (2 * 16 * 3 * 8 * 8 * 64                                      # patch embedding
                + 2 * (2 * 16 * (4 * 64 * 64 + 2 * 64 * 128) + 4 * 16 * 16 * 64)  # 2 layers
                + 2 * 16 * (64 * 128 + 128 * 128))                          # projector
    assert per_crop == 3407872
    assert flops.vision_encoder_flops(tiny, 3) == 3 * 3407872


# -- dense equivalence ---------------------------------------------------------------------------

def test_all_self_config_with_all_layers_is_exactly_dense(tiny):
    cfg = VisorConfig(text_config=tiny.text_config.to_dict(), vision_config=tiny.vision_config.to_dict())
    assert cfg.layer_types == ["self"] * 6
    every = list(range(6))
    assert flops.prefill_flops(cfg, 100, 20, every) == flops.dense_prefill_flops(cfg, 100, 20)
    assert flops.decode_step_flops(cfg, 100, 21, every) == flops.dense_decode_step_flops(cfg, 100, 21)
    r = flops.request_flops(cfg, 100, 20, 50, every)
    assert r["visor_flops"] == r["dense_flops"] and r["savings"] == 1.0
    assert r["visor_decode_flops"] == r["dense_decode_flops"] > 0


# -- closed form vs. loop --------------------------------------------------------------------------

@pytest.mark.parametrize("n_out", [0, 1, 2, 37])
def test_closed_form_decode_sum_matches_loop(cfg05, n_out):
    nv, nt, sa = 729, 64, idx([1, 4, 7, 16])
    r = flops.request_flops(cfg05, nv, nt, n_out, sa)
    steps = range(1, max(n_out - 1, 0) + 1)
    assert r["visor_decode_flops"] == sum(flops.decode_step_flops(cfg05, nv, nt + j, sa) for j in steps)
    assert r["dense_decode_flops"] == sum(flops.dense_decode_step_flops(cfg05, nv, nt + j) for j in steps)
    assert r["visor_flops"] == r["visor_prefill_flops"] + r["visor_decode_flops"]
    assert r["dense_flops"] == r["dense_prefill_flops"] + r["dense_decode_flops"]


@pytest.mark.parametrize("nv,sa", [(0, []), (729, [1, 4]), (100, [1, 4, 7, 16])])
def test_decode_step_affine_is_the_step_cost(cfg05, nv, sa):
    a_visor, a_dense, b = flops.decode_step_affine(cfg05, nv, idx(sa))
    for c in (1, 9, 300):
        assert a_visor + b * c == flops.decode_step_flops(cfg05, nv, c, idx(sa))
        assert a_dense + b * c == flops.dense_decode_step_flops(cfg05, nv, c)


# -- visor-0.5b shape of the savings ---------------------------------------------------------------

@pytest.mark.parametrize("nv", [729, 7290])
def test_savings_strictly_decrease_along_nested_configs(cfg05, nv):
    s = [flops.request_flops(cfg05, nv, 64, 128, idx(c))["savings"] for c in CHAIN]
    assert all(a > b for a, b in zip(s, s[1:])), s
    assert all(flops.request_flops(cfg05, nv, 64, 128, idx(c))["savings"] > 1
               for c in PAPER_SA_CONFIGS_0_5B)


def test_breakdown_uses_paper_numbers(cfg05):
    r = flops.request_flops(cfg05, 729, 64, 16, idx([1, 4, 7]))
    assert r["sa_layers"] == [1, 4, 7] and r["num_sa_layers"] == 3
    assert r["lm_head_flops_per_token"] == 2 * 896 * 151936


@pytest.mark.parametrize("call", [
    lambda c: flops.prefill_flops(c, -1, 8, [0]),
    lambda c: flops.prefill_flops(c, 1, 8, [1]),          # layer 2 (0-based 1) is cross
    lambda c: flops.request_flops(c, 1, 8, -3, [0]),
    lambda c: flops.decode_step_flops(c, 1, 0, [0]),
    lambda c: flops.vision_encoder_flops(c, -1),
])
def test_bad_inputs_raise(tiny, call):
    with pytest.raises(flops.FlopsInputError):
        call(tiny)


# -- CLI -------------------------------------------------------------------------------------------

@pytest.fixture
def run_cli(monkeypatch, capsys):
    # only the sub-command modules that exist yet (checkpoint/convert arrive later)
    mods = tuple(m for m in cli.SUBCOMMAND_MODULES if importlib.util.find_spec(m))
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", mods)

    def run(*args):
        rc = cli.main(["flops", *args])
        return rc, capsys.readouterr()
    return run


BASE = ["--preset", "visor-0.5b", "--image-tokens", "729", "--text-tokens", "64",
        "--output-tokens", "128"]


def test_cli_single_config(run_cli, cfg05):
    rc, out = run_cli(*BASE, "--sa", "1,4,7")
    data = json.loads(out.out)
    assert rc == 0 and data["sa_layers"] == [1, 4, 7] and data["image_tokens"] == 729
    assert data["visor_flops"] == flops.request_flops(cfg05, 729, 64, 128, [0, 3, 6])["visor_flops"]
    assert data["vision_crops_estimate"] == 1
    assert data["vision_encoder_flops"] == flops.vision_encoder_flops(cfg05, 1)


def test_cli_all_configs(run_cli):
    rc, out = run_cli(*BASE, "--all-configs")
    data = json.loads(out.out)
    assert rc == 0 and len(data["configs"]) == 13
    assert [c["sa_layers"] for c in data["configs"]] == PAPER_SA_CONFIGS_0_5B


@pytest.mark.parametrize("extra, msg", [
    (["--sa", "2"], "SA-capable layer numbers are [1, 4, 7, 10, 16, 19, 22]"),
    (["--sa", "1,x"], "comma-separated"),
    ([], "one of the arguments --sa --all-configs is required"),
])
def test_cli_errors_exit_2_with_one_line_message(run_cli, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        run_cli(*BASE, *extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "Traceback" not in err


def test_cli_negative_tokens_and_bad_config_path(run_cli, tmp_path):
    with pytest.raises(SystemExit) as e:
        run_cli("--preset", "visor-0.5b", "--image-tokens", "-1", "--text-tokens", "64",
                "--output-tokens", "1", "--all-configs")
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        run_cli("--config", str(tmp_path / "missing"), "--image-tokens", "1", "--text-tokens", "1",
                "--output-tokens", "1", "--all-configs")
    assert e.value.code == 2


# -- VISOR-TR: packed tokens for VISOR, the image's full count for dense LLaVA-OV ----------------

def test_token_packing_counts_dense_on_the_full_image(cfg05):
    mn = idx([1, 4])
    packed = flops.request_flops(cfg05, 741, 60, 16, mn, n_image_dense=1485)
    plain = flops.request_flops(cfg05, 741, 60, 16, mn)
    full = flops.request_flops(cfg05, 1485, 60, 16, mn)
    assert packed["visor_flops"] == plain["visor_flops"]          # VISOR runs on what it gets
    assert packed["dense_flops"] == full["dense_flops"]            # dense saw the whole image
    assert (packed["image_tokens"], packed["dense_image_tokens"]) == (741, 1485)
    assert packed["savings"] > 1.5 * full["savings"]  # ratio 2 (text and the CA/text layers stay)
    a, d, b = flops.decode_step_affine(cfg05, 741, mn, n_image_dense=1485)
    assert (a, b) == flops.decode_step_affine(cfg05, 741, mn)[::2]
    assert d == flops.decode_step_affine(cfg05, 1485, mn)[1]


def test_cli_dense_image_tokens(run_cli, cfg05):
    rc, out = run_cli(*BASE, "--sa", "1,4", "--dense-image-tokens", "1485")
    data = json.loads(out.out)
    assert rc == 0 and data["dense_image_tokens"] == 1485 and data["image_tokens"] == 729
    assert data["dense_flops"] == flops.request_flops(cfg05, 1485, 64, 128, [0, 3])["dense_flops"]


def test_each_count_reads_the_config_dimensions_once(cfg05, monkeypatch):
    """The engine counts every joining row's FLOPs on the step's critical path
    (`visor_vllm.engine.bridge`), and a transformers config's attribute reads are slow: each
    public count reads the text config's dimensions once, not once per layer (the counts
    themselves are pinned by the tests above)."""
    calls = []
    real = flops._dims
    monkeypatch.setattr(flops, "_dims", lambda cfg: calls.append(1) or real(cfg))
    sa = cfg05.sa_configs[-1]
    for count, expected in ((lambda: flops.prefill_flops(cfg05, 729, 60, sa), 1),
                            (lambda: flops.dense_prefill_flops(cfg05, 729, 60), 1),
                            (lambda: flops.decode_step_affine(cfg05, 729, sa), 1),
                            (lambda: flops.decode_step_flops(cfg05, 729, 61, sa), 1),
                            (lambda: flops.request_flops(cfg05, 729, 60, 8, sa), 3)):
        calls.clear()
        count()
        assert len(calls) == expected
