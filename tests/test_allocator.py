"""`visor_vllm.allocator`: tcmalloc for the CLI and the vLLM servers it starts; glibc tuned."""

import subprocess
import sys
from pathlib import Path

import pytest

from visor_vllm import allocator, cli
from visor_vllm.allocator import AllocatorError, find_tcmalloc, preload_environment, reexec_command


# a cheap real command
FLOPS = ["flops", "--preset", "tiny", "--image-tokens", "4", "--text-tokens", "3",
         "--output-tokens", "1", "--sa", "1"]


@pytest.fixture
def fake_lib(tmp_path):
    lib = tmp_path / allocator.LIBRARY
    lib.write_bytes(b"")  # only ever looked up here, never loaded
    return str(lib)


def test_visor_tcmalloc_names_the_library_or_turns_it_off(fake_lib, tmp_path):
    assert find_tcmalloc({"VISOR_TCMALLOC": fake_lib}) == fake_lib
    assert find_tcmalloc({"VISOR_TCMALLOC": "0"}) is None
    with pytest.raises(AllocatorError, match="no such file"):
        find_tcmalloc({"VISOR_TCMALLOC": str(tmp_path / "missing.so")})


def test_unset_it_is_the_venvs_then_the_systems(monkeypatch, tmp_path, fake_lib):
    monkeypatch.setattr(allocator.sys, "prefix", str(Path(fake_lib).parent.parent))
    (Path(fake_lib).parent.parent / "lib").mkdir()
    venv_lib = Path(fake_lib).parent.parent / "lib" / allocator.LIBRARY
    venv_lib.write_bytes(b"")
    monkeypatch.setattr(allocator, "SYSTEM_DIRS", (str(tmp_path / "nowhere"),))
    assert find_tcmalloc({}) == str(venv_lib)
    venv_lib.unlink()
    assert find_tcmalloc({}) is None  # nothing anywhere: glibc, no error
    monkeypatch.setattr(allocator, "SYSTEM_DIRS", (str(Path(fake_lib).parent),))
    assert find_tcmalloc({}) == fake_lib


def test_the_servers_environment_preloads_it_first_once(fake_lib):
    env = {"VISOR_TCMALLOC": fake_lib, "PATH": "/bin"}
    assert preload_environment(env)["LD_PRELOAD"] == fake_lib
    both = preload_environment({**env, "LD_PRELOAD": "/x/libgomp.so"})
    assert both["LD_PRELOAD"] == f"{fake_lib}:/x/libgomp.so"
    assert preload_environment(both) == both  # already in
    assert "LD_PRELOAD" not in preload_environment({"VISOR_TCMALLOC": "0"})


def test_the_cli_execs_itself_once_with_it(fake_lib):
    exe, argv, env = reexec_command(["recipe", "synthetic"], {"VISOR_TCMALLOC": fake_lib})
    assert exe == sys.executable and argv[1:] == ["-m", "visor_vllm.cli", "recipe", "synthetic"]
    assert env["LD_PRELOAD"] == fake_lib and env["VISOR_TCMALLOC_REEXEC"] == "1"
    assert reexec_command(["x"], env) is None  # the exec'd process never execs again
    assert reexec_command(["x"], {"VISOR_TCMALLOC": "0"}) is None
    assert reexec_command(["x"], {"VISOR_TCMALLOC": fake_lib, "LD_PRELOAD": fake_lib}) is None


def test_cli_main_execs_only_from_the_shell(monkeypatch, fake_lib):
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setenv("VISOR_TCMALLOC", fake_lib)
    monkeypatch.delenv("VISOR_TCMALLOC_REEXEC", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    args = FLOPS
    assert cli.main(args) == 0 and not calls  # in-process callers (tests, scripts): no exec
    monkeypatch.setattr(sys, "argv", ["visor-vllm", *args])
    assert cli.main() == 0  # the fake execve returned: the command ran as it is
    (exe, argv, env), = calls
    assert argv[3:] == args and env["LD_PRELOAD"].startswith(fake_lib)


def test_a_bad_visor_tcmalloc_stops_the_cli_with_a_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("VISOR_TCMALLOC", str(tmp_path / "nope.so"))
    monkeypatch.delenv("VISOR_TCMALLOC_REEXEC", raising=False)
    monkeypatch.setattr(sys, "argv", ["visor-vllm", *FLOPS])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err


def test_the_launcher_hands_it_to_vllm_serve(monkeypatch, fake_lib, tmp_path):
    from visor_vllm.evaluation import launch

    seen = {}

    class Popen:
        def __init__(self, cmd, stdout, stderr, env):
            seen.update(env)

    monkeypatch.setattr(launch.subprocess, "Popen", Popen)
    monkeypatch.setenv("VISOR_TCMALLOC", fake_lib)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    (tmp_path / "config.json").write_text('{"model_type": "visor"}')
    launch._start(tmp_path, log=tmp_path / "log")
    assert seen["LD_PRELOAD"] == fake_lib and seen["VLLM_CPU_KVCACHE_SPACE"] == "1"


@pytest.mark.skipif(find_tcmalloc({}) is None, reason="no tcmalloc on this machine")
def test_a_preloaded_process_runs_on_tcmalloc():
    """The real library: what `scripts/setup.sh` fetched (or the system's) loads and is used."""
    code = "from visor_vllm.allocator import in_use; print(in_use())"
    env = preload_environment({"PATH": "/usr/bin:/bin"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "tcmalloc", out.stderr
    plain = subprocess.run([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True)
    assert plain.stdout.strip() == "glibc"


def test_in_use_reads_the_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 0:0 0 /usr/lib/libtcmalloc_minimal.so.4\n")
    assert allocator.in_use(maps) == "tcmalloc"
    maps.write_text("7f00-7f01 r-xp 0 0:0 0 /usr/lib/libc.so.6\n")
    assert allocator.in_use(maps) == "glibc"
    assert allocator.in_use(tmp_path / "missing") is None


def test_the_trainer_fixes_glibc_malloc_thresholds(monkeypatch):
    """Fixed mmap/trim thresholds (measured: 3.5M -> 0.2M page faults per 100 steps); opt-out."""
    monkeypatch.setenv("VISOR_MALLOC_TUNING", "0")
    assert allocator.tune_host_allocator() is False
    monkeypatch.delenv("VISOR_MALLOC_TUNING")
    assert allocator.tune_host_allocator() is sys.platform.startswith("linux")
