"""The deployment files agree with each other and with the code: compose profiles, Prometheus
targets and rules, the provisioned Grafana dashboard and the metric names it queries.

``docker compose config`` and ``promtool`` run when they are installed (not on CI)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _profiles(service: dict) -> set[str]:
    return set(service.get("profiles", []))


def test_both_profiles_have_a_server_prometheus_and_grafana(compose):
    services = compose["services"]
    for profile in ("cpu", "rocm"):
        active = {n for n, s in services.items() if profile in _profiles(s)}
        assert {"prometheus", "grafana"} <= active
        servers = [n for n in active if n.startswith("visor")]
        assert len(servers) == 1, (profile, servers)
        aliases = services[servers[0]]["networks"]["default"]["aliases"]
        assert "visor" in aliases  # what targets.json scrapes
        assert "command" not in services[servers[0]]  # the image's CMD is the one command


def test_mounted_files_and_build_files_exist(compose):
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), src
        build = service.get("build")
        if build:
            assert (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).exists()


def test_prometheus_scrapes_the_compose_server_and_loads_its_rules():
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rules in cfg["rule_files"]:
        assert (DEPLOY / "prometheus" / rules).exists()
    (job,) = cfg["scrape_configs"]
    files = job["file_sd_configs"][0]["files"]
    targets = [t for f in files for g in json.loads((DEPLOY / "prometheus" / f).read_text())
               for t in g["targets"]]
    assert targets == ["visor:8000"]


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "visor.json").read_text())


def test_dashboard_is_in_grafanas_provisioning_format(compose):
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/visor.yml").read_text())
    assert ds["apiVersion"] == 1 and prov["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    mounts = {v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]}
    assert prov["providers"][0]["options"]["path"] in mounts
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and dash["panels"] and "id" not in dash
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["targets"]
        assert all(t["expr"] and t["datasource"]["uid"] == source["uid"] for t in panel["targets"])


def test_dashboard_is_what_its_generator_writes():
    out = subprocess.run(["python3", str(DEPLOY / "grafana" / "make_dashboard.py")], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out) == _dashboard()


def _exprs() -> list[str]:
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    return exprs + [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_every_queried_visor_series_exists():
    from prometheus_client import REGISTRY

    from visor_vllm.serving.stat_logger import VisorMetrics

    VisorMetrics.get()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names = {m.name + x for m in REGISTRY.collect() for x in suffixes.get(m.type, ("",))}
    for expr in _exprs():
        for name in re.findall(r"\b(visor:[a-z_]+)", expr):
            assert name in names, (name, expr)


def test_every_queried_vllm_series_exists():
    vllm = pytest.importorskip("vllm")
    source = (Path(vllm.__file__).parent / "v1" / "metrics" / "loggers.py").read_text()
    declared = set(re.findall(r'name="(vllm:[a-z_]+)"', source))
    for expr in _exprs():
        for name in re.findall(r"\b(vllm:[a-z_]+)", expr):
            base = re.sub(r"_(bucket|sum|count|total)$", "", name)
            assert name in declared or base in declared, (name, expr)


@pytest.mark.parametrize("profile", ["cpu", "rocm"])
def test_docker_compose_config_validates(profile):
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        cmd = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        cmd = ["docker-compose"]
    else:
        pytest.skip("docker compose is not installed")
    subprocess.run([*cmd, "--profile", profile, "config", "-q"], cwd=ROOT, check=True)


def test_promtool_accepts_config_rules_and_dashboard_queries(tmp_path):
    if not shutil.which("promtool"):
        pytest.skip("promtool is not installed")
    subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                   check=True, capture_output=True)
    # every dashboard query, with Grafana's range variables filled in, as a recording rule
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": e.replace("$__rate_interval", "1m")
                                                .replace("$__range", "1h")}
        for i, e in enumerate(_exprs())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    subprocess.run(["promtool", "check", "rules", str(path)], check=True, capture_output=True)
