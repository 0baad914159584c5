"""The ``visor:*`` Prometheus series, exported by a vLLM stat-logger plugin: no flag needed.

What. `VisorStatLogger` is registered under vLLM's ``vllm.stat_logger_plugins`` entry point
group, which ``vllm serve`` (every `AsyncLLM`) loads by default, so ``vllm serve DIR`` of a
VISOR checkpoint serves these series on ``/metrics`` next to ``vllm:*``:

| series | what |
|---|---|
| ``visor:llm_flops_total{phase}`` | LLM FLOPs VISOR executed (prefill, decode) |
| ``visor:dense_equivalent_flops_total{phase}`` | what dense LLaVA-OV would have executed |
| ``visor:requests_total{sa_layers,budget_source}`` | requests per SA configuration (1-based) |
| ``visor:sa_layers_per_request`` | histogram of SA layers per request |
| ``visor:visual_tokens_per_request`` | histogram of visual tokens per request |
| ``visor:flops_cap_missed_total`` | requests whose ``visor_max_flops`` no configuration met |

After every engine step vLLM calls `record`; it drains what the engine's worker counted
(`visor_vllm.engine.stats`: FLOPs as executed, one event per request) and adds it here. The
middleware (`visor_vllm.serving.middleware`) only adds per-response receipts; it counts nothing.

Why a stat logger. It runs in each API server process, which is where ``/metrics`` is served,
and vLLM calls it after each step, so the series are current one engine step after a
response ends (a request's decode FLOPs reach the stats file when the batch changes after it,
`visor_vllm.engine.bridge.RowState.flush`; prefill FLOPs and events at its first step). The
prometheus_client objects are created lazily, after vLLM has chosen its registry mode, so
``--api-server-count > 1`` (multiprocess mode) aggregates them; the stats file's shared cursor
makes sure each step is exported by one API server only.

Footguns.
* The plugin is loaded for every model in this environment; it is inert unless the served model
  is VISOR (``model_type == "visor"``).
* Installing any stat-logger plugin makes vLLM collect stats even with ``--disable-log-stats``
  (vLLM's rule, logged at start); that flag does not turn ``visor:*`` off.
* A request counts at its first step (``visor:requests_total``, histograms); FLOPs count as the
  engine runs them, so an aborted request counts the prefill and the decode steps it ran.
"""

from __future__ import annotations

import logging

from visor_vllm.engine import stats

try:
    from vllm.v1.metrics.loggers import StatLoggerBase
except ImportError:  # pragma: no cover - reference-only installs
    StatLoggerBase = object  # type: ignore[misc,assignment]

logger = logging.getLogger(__name__)


class VisorMetrics:
    """The ``visor:*`` series. Created once per process, after vLLM chose its registry mode."""

    _instance: VisorMetrics | None = None

    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.flops = Counter("visor:llm_flops", "LLM FLOPs VISOR executed (analytic, "
                             "visor_vllm.model.flops)", ["phase"])
        self.dense_flops = Counter("visor:dense_equivalent_flops", "LLM FLOPs dense LLaVA-"
                                   "OneVision would have executed for the same requests", ["phase"])
        self.requests = Counter("visor:requests", "Requests by SA configuration (1-based layer "
                                "numbers) and budget source", ["sa_layers", "budget_source"])
        self.sa_layers = Histogram("visor:sa_layers_per_request", "SA layers a request ran",
                                   buckets=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 24, 32])
        self.visual_tokens = Histogram("visor:visual_tokens_per_request", "Visual tokens of a "
                                       "request", buckets=[0, 64, 256, 729, 1024, 1500, 2048, 3000,
                                                           4096, 6000, 8192, 12000, 16384])
        self.cap_missed = Counter("visor:flops_cap_missed", "Requests whose visor_max_flops no "
                                  "configuration could meet (the cheapest ran)")
        for phase in ("prefill", "decode"):  # series at 0 from the start: rate() works at once
            self.flops.labels(phase)
            self.dense_flops.labels(phase)

    @classmethod
    def get(cls) -> VisorMetrics:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def add(self, flops: list[float], events: list[tuple[int, ...]]) -> None:
        """One drain of `visor_vllm.engine.stats.StatsReader`: FLOPs in `stats.PHASES` order."""
        for (kind, phase), value in zip(stats.PHASES, flops):
            if value:
                (self.flops if kind == "visor" else self.dense_flops).labels(phase).inc(value)
        for sa_bits, source, n_image, _n_text, cap_met in events:
            layers = [i + 1 for i in range(sa_bits.bit_length()) if sa_bits >> i & 1]
            self.requests.labels(",".join(map(str, layers)), stats.SOURCES[source]).inc()
            self.sa_layers.observe(len(layers))
            self.visual_tokens.observe(n_image)
            if not cap_met:
                self.cap_missed.inc()


class VisorStatLogger(StatLoggerBase):
    """vLLM per-engine stat logger (``vllm.stat_logger_plugins``); see the module docstring."""

    def __init__(self, vllm_config, engine_index: int = 0):
        hf = vllm_config.model_config.hf_config
        self.active = getattr(hf, "model_type", None) == "visor"
        self.path = stats.stats_path(engine_index)
        self.reader: stats.StatsReader | None = None
        self._warned = False

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if not self.active:
            return
        try:  # a side channel: never fails the step that vLLM is logging
            if self.reader is None:
                self.reader = stats.StatsReader.open(self.path)
                if self.reader is None:
                    return  # the engine has not run a VISOR step yet
            drained = self.reader.drain()
            if drained is None:
                return  # another API server process exports this round
            flops, events, lost = drained
            if any(flops) or events:
                VisorMetrics.get().add(flops, events)
            if lost:
                logger.warning("VISOR: %d request events were overwritten before export", lost)
        except Exception:  # noqa: BLE001
            if not self._warned:
                self._warned = True
                logger.exception("VISOR: visor:* metrics could not be updated from %s", self.path)

    def log_engine_initialized(self):
        if self.active:
            VisorMetrics.get()  # the series exist (at 0) from the start, before any request
