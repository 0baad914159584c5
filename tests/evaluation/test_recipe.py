"""The served side of `visor-vllm recipe synthetic` (visor_vllm.evaluation.recipe), pure parts."""

import pytest

from visor_vllm.evaluation.recipe import _paired_ratio_ci


def _pass(correct, start=0):
    return {"samples": [{"index": start + i, "correct": c} for i, c in enumerate(correct)]}


def test_router_interval_pairs_the_two_passes_by_question():
    full = _pass([1] * 800 + [0] * 200)
    router = _pass([1] * 790 + [0] * 210)
    lo, hi = _paired_ratio_ci(router, full)           # 0.9875 +- 0.0077 (stats' known value)
    assert lo == pytest.approx(0.9798, abs=2e-4) and hi == pytest.approx(0.9952, abs=2e-4)
    # joined by question, not by position: a shuffled pass gives the same interval
    shuffled = {"samples": full["samples"][::-1]}
    assert _paired_ratio_ci(router, shuffled) == [lo, hi]
    # only the questions both passes answered count: 500-999, where the router has 290 right
    lo2, hi2 = _paired_ratio_ci(router, _pass([1] * 1000, start=500))
    assert (lo2 + hi2) / 2 == pytest.approx(290 / 500, abs=1e-4)
    assert _paired_ratio_ci({"samples": []}, full) is None
    assert _paired_ratio_ci(router, {}) is None


def test_servers_schedule_as_many_sequences_as_the_client_keeps_in_flight(tmp_path, monkeypatch):
    """The recipe's served pass starts both servers with ``--max-num-seqs`` = its concurrency
    (vLLM's default 16 made a client at 64 queue; 64 and 64 answered 1.28x the requests a
    second of 16 and 16, the same answers, 2026-12-07)."""
    import contextlib
    import json

    from visor_vllm.evaluation import recipe

    (tmp_path / "visor").mkdir()
    (tmp_path / "visor" / "config.json").write_text(json.dumps({"sa_configs": [[0]]}))
    started, asked = [], []

    @contextlib.contextmanager
    def fake_served_together(servers, startup_s=300.0):
        started.append([(kw["name"], list(kw["extra"])) for kw in servers])
        yield [(f"http://{kw['name']}", kw["log"]) for kw in servers]

    monkeypatch.setattr(recipe, "served_together", fake_served_together)
    monkeypatch.setattr(recipe, "evaluate_served",
                        lambda base, data, name, budgets, **kw: asked.append(
                            (base, name, kw["concurrency"])))
    monkeypatch.setattr(recipe, "merge_served", lambda report, v, d: report)
    recipe.serve_and_evaluate(tmp_path, {}, {"concurrency": 48}, progress=False)
    # both servers start together (one start-up's time), each model asked at its own URL
    assert started == [[("visor", ["--max-num-seqs", "48"]), ("dense", ["--max-num-seqs", "48"])]]
    assert asked == [("http://visor", "visor", 48), ("http://dense", "dense", 48)]
    with pytest.raises(ValueError, match="serve.concurrency is a number"):
        recipe.serve_and_evaluate(tmp_path, {}, {"concurrency": None}, progress=False)


def test_a_bad_visor_tcmalloc_stops_the_recipe_before_training(tmp_path, monkeypatch):
    """The servers' allocator is checked up front: not after a 30-minute training run."""
    from visor_vllm.allocator import AllocatorError
    from visor_vllm.evaluation import recipe

    trained = []
    monkeypatch.setattr(recipe, "run_synthetic", lambda *a, **k: trained.append(1) or {})
    monkeypatch.setenv("VISOR_TCMALLOC", str(tmp_path / "missing.so"))
    with pytest.raises(AllocatorError, match="no such file"):
        recipe.run_recipe(tmp_path / "run")
    assert not trained
    recipe.run_recipe(tmp_path / "run", serve=False)  # nothing served: nothing to check
    assert trained
