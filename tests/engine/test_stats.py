"""The worker -> API server stats channel behind ``visor:*``: private, exact, exported once."""

import os

import pytest

from visor_vllm.engine import receipts, stats


@pytest.fixture
def path(tmp_path, monkeypatch):
    monkeypatch.setenv(receipts.DIR_ENV, str(tmp_path / "run"))
    return stats.stats_path(0, server="inst/../1")


def test_path_is_inside_the_private_runtime_dir(path, tmp_path):
    assert path.parent == tmp_path / "run" and path.name == "stats-inst____1-0.bin"
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700


def test_runtime_dir_refuses_what_another_user_could_write(tmp_path, monkeypatch):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    monkeypatch.setenv(receipts.DIR_ENV, str(loose))
    with pytest.raises(receipts.RuntimeDirError, match="mode 0700"):
        receipts.runtime_dir()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(private)
    monkeypatch.setenv(receipts.DIR_ENV, str(link))
    with pytest.raises(receipts.RuntimeDirError, match="symlink"):
        receipts.runtime_dir()


def test_flops_and_events_arrive_once_across_readers(path):
    w = stats.StatsWriter(path, ring=4)
    assert path.stat().st_mode & 0o777 == 0o600
    assert stats.StatsReader.open(path.with_name("absent.bin")) is None
    a, b = stats.StatsReader(path), stats.StatsReader(path)  # two API server processes
    w.add(10.0, 2.0, 30.0, 4.0, [(0b1001, 0, 16, 8, 1)])
    assert a.drain() == ([10.0, 2.0, 30.0, 4.0], [(9, 0, 16, 8, 1)], 0)
    assert b.drain() == ([0.0, 0.0, 0.0, 0.0], [], 0)  # already exported by a
    w.add(0.0, 5.0, 0.0, 7.0)
    assert b.drain() == ([0.0, 5.0, 0.0, 7.0], [], 0)
    with pytest.raises(FileExistsError):  # a second writer never takes over a live one's file
        stats.StatsWriter(path)
    w.close()
    assert not path.exists()


def test_a_reader_far_behind_loses_old_events_and_says_so(path):
    w = stats.StatsWriter(path, ring=4)
    r = stats.StatsReader(path)
    w.add(events=[(k, 0, k, 1, 1) for k in range(6)])
    _, events, lost = r.drain()
    assert lost == 2 and [e[0] for e in events] == [2, 3, 4, 5]


def test_reader_refuses_a_file_others_could_write(path):
    stats.StatsWriter(path)
    os.chmod(path, 0o666)
    with pytest.raises(PermissionError, match="private"):
        stats.StatsReader(path)


def test_writer_errors_never_escape(path):
    w = stats.StatsWriter(path, ring=4)
    w.add(events=[("not", "a", "number", 0, 0)])  # logged once, swallowed
    w.add(1.0)
    assert stats.StatsReader(path).drain()[0] == [1.0, 0.0, 0.0, 0.0]


def test_a_dead_writers_file_is_taken_over(path):
    w = stats.StatsWriter(path, ring=4)
    w.add(5.0)
    w.head[7] = 2**22 + 12345  # as if written by a pid that no longer runs
    fresh = stats.StatsWriter(path, ring=4)
    assert stats.StatsReader(path).drain()[0] == [0.0, 0.0, 0.0, 0.0] and fresh.path == path


def test_a_top_level_process_names_a_new_server(monkeypatch):
    monkeypatch.setenv(stats.SERVER_ENV, "inherited-from-elsewhere")
    stats.claim_server_id()  # pytest is a top-level process, as `vllm serve` is
    assert os.environ[stats.SERVER_ENV] != "inherited-from-elsewhere"
    assert stats.stats_path(1).name == f"stats-{os.environ[stats.SERVER_ENV]}-1.bin"
