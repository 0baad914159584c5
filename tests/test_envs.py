"""visor_vllm/envs.py is the one place the package reads or sets environment variables."""

import ast
from pathlib import Path

import pytest

from visor_vllm import envs

PKG = Path(__file__).resolve().parents[1] / "visor_vllm"


def _touches_environ(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv") \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            out.append(f"{path.relative_to(PKG)}:{node.lineno} os.{node.attr}")
    return out


def test_no_module_but_envs_touches_the_environment():
    bad = [hit for p in sorted(PKG.rglob("*.py")) if p.name != "envs.py"
           for hit in _touches_environ(p)]
    assert not bad, "read or set variables through visor_vllm.envs:\n" + "\n".join(bad)


def test_every_variable_is_documented_and_parses_unset(monkeypatch):
    for name in envs.environment_variables:
        if name.startswith("VLLM_"):
            continue  # vLLM's own, through vllm.envs
        monkeypatch.delenv(name, raising=False)
        getattr(envs, name)  # its default
        assert len(envs.describe()[name]) > 20, name
    assert envs.VISOR_CHECK_HOST_SYNC == "off" and envs.VISOR_MALLOC_TUNING is True
    assert envs.RANK is None and envs.LOCAL_RANK == 0


def test_values_are_typed_and_bad_ones_named(monkeypatch):
    monkeypatch.setenv("VISOR_CHECK_HOST_SYNC", "count")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("VISOR_ALLOW_LOOPBACK_MEDIA", "1")
    assert envs.VISOR_CHECK_HOST_SYNC == "count" and envs.FSDP_VERSION == 2
    assert envs.VISOR_ALLOW_LOOPBACK_MEDIA is True
    monkeypatch.setenv("VISOR_ALLOW_LOOPBACK_MEDIA", "true")  # a security switch: exactly 1
    assert envs.VISOR_ALLOW_LOOPBACK_MEDIA is False
    monkeypatch.setenv("VISOR_CHECK_HOST_SYNC", "sometimes")
    with pytest.raises(ValueError, match="VISOR_CHECK_HOST_SYNC='sometimes'"):
        envs.VISOR_CHECK_HOST_SYNC
    with pytest.raises(AttributeError):
        envs.VISOR_NOT_A_VARIABLE


def test_writes_only_documented_names(monkeypatch):
    with pytest.raises(KeyError, match="not a documented"):
        envs.export("VISOR_TYPO", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    envs.apply_server_defaults()
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "0"  # the user's value wins
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert envs.get("VISOR_VISION_CACHE_MB", {"VISOR_VISION_CACHE_MB": "8"}) == "8"
