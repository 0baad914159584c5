"""The stat-logger plugin: drains the engine's stats file into ``visor:*``; inert otherwise."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
from prometheus_client import REGISTRY

from visor_vllm.engine import receipts, stats
from visor_vllm.model.config import preset_tiny
from visor_vllm.serving.stat_logger import VisorStatLogger

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


def config(model_type="visor"):
    hf = preset_tiny() if model_type == "visor" else NS(model_type=model_type)
    return NS(model_config=NS(hf_config=hf))


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_is_a_vllm_stat_logger_plugin():
    from importlib.metadata import entry_points

    from vllm.v1.metrics.loggers import StatLoggerBase, load_stat_logger_plugin_factories

    assert issubclass(VisorStatLogger, StatLoggerBase)
    assert "visor" in entry_points(group="vllm.stat_logger_plugins").names
    assert VisorStatLogger in load_stat_logger_plugin_factories()


def test_drains_flops_and_requests_into_the_series(tmp_path, monkeypatch):
    monkeypatch.setenv(receipts.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(stats.SERVER_ENV, "unit")
    log = VisorStatLogger(config(), 0)
    log.log_engine_initialized()
    log.record(None, None)  # no stats file yet: nothing, no error
    w = stats.StatsWriter(stats.stats_path(0))
    before = (sample("visor:llm_flops_total", phase="decode"),
              sample("visor:requests_total", sa_layers="1,4", budget_source="override"),
              sample("visor:flops_cap_missed_total"))
    w.add(100.0, 7.0, 300.0, 9.0, [(0b1001, stats.SOURCES.index("override"), 16, 5, 0)])
    log.record(None, None)
    log.record(None, None)  # drained once: no double count
    assert sample("visor:llm_flops_total", phase="decode") - before[0] == 7.0
    assert sample("visor:requests_total", sa_layers="1,4", budget_source="override") - before[1] == 1
    assert sample("visor:flops_cap_missed_total") - before[2] == 1


def test_inert_for_other_models_and_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv(receipts.DIR_ENV, str(tmp_path))
    VisorStatLogger(config("llama"), 0).record(None, None)
    monkeypatch.setenv(stats.SERVER_ENV, "broken")
    path = stats.stats_path(0)
    path.write_bytes(b"\0" * 10)  # not a stats file: treated as not there yet
    path.chmod(0o600)
    VisorStatLogger(config(), 0).record(None, None)
