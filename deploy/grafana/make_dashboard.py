"""Writes deploy/grafana/dashboards/visor.json (the provisioned VISOR dashboard): python deploy/grafana/make_dashboard.py > deploy/grafana/dashboards/visor.json"""
import json
DS = {"type": "prometheus", "uid": "visor-prometheus"}
panels, y = [], 0
def panel(title, kind, targets, w=12, h=8, unit=None, desc="", x=None, extra=None):
    global y
    p = {"id": len(panels) + 1, "title": title, "type": kind, "datasource": DS, "description": desc,
         "gridPos": {"h": h, "w": w, "x": 0 if x is None else x, "y": y},
         "targets": [dict(datasource=DS, refId=chr(65 + i), expr=e, legendFormat=l)
                     for i, (e, l) in enumerate(targets)],
         "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
         "options": {}}
    if extra: p.update(extra)
    panels.append(p)
    return p
def row():
    global y
    y += 8
panel("LLM FLOPs saved vs dense LLaVA-OV", "stat",
      [("1 - sum(rate(visor:llm_flops_total[$__rate_interval])) / sum(rate(visor:dense_equivalent_flops_total[$__rate_interval]))", "all"),
       ("1 - sum(rate(visor:llm_flops_total{phase=\"prefill\"}[$__rate_interval])) / sum(rate(visor:dense_equivalent_flops_total{phase=\"prefill\"}[$__rate_interval]))", "prefill")],
      w=6, unit="percentunit", desc="1 - VISOR FLOPs / dense-equivalent FLOPs, as executed (visor:* from the stat-logger plugin)")
panel("FLOPs executed per second", "timeseries",
      [("sum by (phase) (rate(visor:llm_flops_total[$__rate_interval]))", "VISOR {{phase}}"),
       ("sum by (phase) (rate(visor:dense_equivalent_flops_total[$__rate_interval]))", "dense {{phase}}")],
      w=18, x=6, unit="short", desc="What VISOR ran, against what dense LLaVA-OneVision would have run for the same requests")
row()
panel("Configuration mix (requests/s by SA layers)", "timeseries",
      [("sum by (sa_layers) (rate(visor:requests_total[$__rate_interval]))", "SA {{sa_layers}}")],
      unit="reqps", desc="Which SA configuration requests ran (1-based layer numbers)",
      extra={"fieldConfig": {"defaults": {"unit": "reqps", "custom": {"stacking": {"mode": "normal"}, "fillOpacity": 30}}, "overrides": []}})
panel("Budget source", "piechart",
      [("sum by (budget_source) (increase(visor:requests_total[$__range]))", "{{budget_source}}")],
      w=6, x=12, desc="router: the router chose; default: VISOR_DEFAULT_BUDGET; override: the request's vllm_xargs")
panel("SA layers per request (mean)", "stat",
      [("sum(rate(visor:sa_layers_per_request_sum[$__rate_interval])) / sum(rate(visor:sa_layers_per_request_count[$__rate_interval]))", "mean")],
      w=6, x=18, unit="short")
row()
panel("SA layers per request (distribution)", "bargauge",
      [("sum by (le) (increase(visor:sa_layers_per_request_bucket[$__range]))", "{{le}}")],
      w=8, extra={"options": {"displayMode": "basic", "orientation": "horizontal"}})
panel("Visual tokens per request (p50, p95)", "timeseries",
      [("histogram_quantile(0.5, sum by (le) (rate(visor:visual_tokens_per_request_bucket[$__rate_interval])))", "p50"),
       ("histogram_quantile(0.95, sum by (le) (rate(visor:visual_tokens_per_request_bucket[$__rate_interval])))", "p95")],
      w=8, x=8, unit="short")
panel("FLOP caps missed", "stat", [("sum(increase(visor:flops_cap_missed_total[$__range]))", "missed")],
      w=8, x=16, desc="Requests whose visor_max_flops no configuration could meet (the cheapest ran)")
row()
panel("Time to first token (vllm:*)", "timeseries",
      [("histogram_quantile(0.5, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[$__rate_interval])))", "p50"),
       ("histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[$__rate_interval])))", "p95")],
      w=8, unit="s")
panel("Inter-token latency (vllm:*)", "timeseries",
      [("histogram_quantile(0.5, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket[$__rate_interval])))", "p50"),
       ("histogram_quantile(0.95, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket[$__rate_interval])))", "p95")],
      w=8, x=8, unit="s")
panel("KV cache use and queue (vllm:*)", "timeseries",
      [("max(vllm:kv_cache_usage_perc)", "KV cache used"),
       ("sum(vllm:num_requests_running)", "running"), ("sum(vllm:num_requests_waiting)", "waiting")],
      w=8, x=16, unit="percentunit",
      extra={"fieldConfig": {"defaults": {"unit": "percentunit"}, "overrides": [
          {"matcher": {"id": "byRegexp", "options": "running|waiting"},
           "properties": [{"id": "unit", "value": "short"}, {"id": "custom.axisPlacement", "value": "right"}]}]}})
dash = {"uid": "visor-vllm", "title": "VISOR", "tags": ["visor", "vllm"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": False, "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"}, "panels": panels,
        "templating": {"list": []}, "annotations": {"list": []},
        "description": "VISOR on vLLM: FLOPs saved, configuration mix, SA layers per request, latency and KV use. Generated by deploy/grafana/make_dashboard.py."}
print(json.dumps(dash, indent=2))
