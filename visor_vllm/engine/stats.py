"""Executed-FLOP accounting, from the worker to the API server: the channel behind ``visor:*``.

What. The rank-0 worker of each engine counts what VISOR *executes*, step by step, into a small
shared-memory file (`StatsWriter`); the API server's stat-logger plugin
(`visor_vllm.serving.stat_logger`, loaded by plain ``vllm serve`` from the
``vllm.stat_logger_plugins`` entry point) drains it after every engine step (`StatsReader`) and
turns it into the ``visor:*`` Prometheus series. No flag, no middleware, no request id needed:

* FLOPs: four float64 accumulators (VISOR prefill/decode, dense-equivalent prefill/decode).
  A request's first step adds its prefill (`visor_vllm.model.flops.prefill_flops`, on the text
  tokens the step really ran); every later step adds ``a + b*c`` per token
  (`visor_vllm.model.flops.decode_step_affine`) on the device, written here when the batch
  changes (`visor_vllm.engine.bridge.RowState.flush`: no host read in a steady decode step).
  So ``n > 1`` (one row per sample), lists of prompts, every endpoint (``/v1/responses``,
  ``/v1/messages``, ...), aborted requests and preemption (its re-prefill is real work) are counted as the engine ran them.
* Requests: one event per request at its first step (SA layers, budget source, token counts,
  FLOP cap met) in a ring the reader consumes; a request resumed after preemption is no new event.

Layout (one file per engine, ``<runtime dir>/stats-<server>-<engine index>.bin``: vLLM's
``data_parallel_index``, mode 0600): a float64
header (magic, ring size, events written, the four FLOP sums, the writer's pid, then the
*exported* cursor and sums) and an int64 ring of `EVENT_FIELDS`. One writer; readers (one per API server process)
take an ``flock`` and move the exported cursor, so with ``--api-server-count N`` the series are
exported once, not N times.

Why not the receipts. Receipts (`visor_vllm.engine.receipts`) need an id the middleware puts in
``vllm_xargs``; plain ``vllm serve`` has no middleware and vLLM 0.32 gives a logits processor no
request id. Counting executed work in the worker needs neither, and cannot disagree with what ran.

Which server. ``vllm serve``'s main process names the server (`claim_server_id`, called by the
plugin's ``register()``): ``$VISOR_SERVER_ID``, inherited by every process it starts (API
servers, engine core, workers). ``VllmConfig.instance_id`` cannot be the key: each API server
process builds its own config, with its own id.

Footguns.
* Float64 sums are exact to 2^53 FLOPs and then lose about 1e-16 relatively: fine for counters.
* The ring holds `RING` events; a reader more than that many requests behind (it drains every
  engine step, so only a stalled API server) loses events and logs how many.
* A chunked prefill's later chunks would count as decode tokens; VISOR prefills a prompt in one
  step (its ``--max-num-batched-tokens`` covers the largest prompt).
* Accounting is a side channel: the writer swallows and logs its own errors (once) and never
  fails a step; the reader never fails a request.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import multiprocessing
import os
import re
import secrets
import time
from pathlib import Path

import numpy as np

from visor_vllm import envs
from visor_vllm.engine import receipts
from visor_vllm.engine.receipts import runtime_dir

logger = logging.getLogger(__name__)

MAGIC = 20260301.0
RING = 8192
SOURCES = ("router", "default", "override")  # Budget.source, as a small integer in events
# event: bitmask of active SA layers (0-based bit i = layer i), budget source, image tokens,
# prompt text tokens, FLOP cap met (0/1)
EVENT_FIELDS = ("sa_bits", "source", "n_image", "n_text", "cap_met")
_HEADER = 16  # float64 slots
_MAGIC, _RING, _WRITTEN, _FLOPS, _PID = 0, 1, 2, slice(3, 7), 7
_EXPORTED, _EXPORTED_FLOPS = 8, slice(9, 13)
PHASES = (("visor", "prefill"), ("visor", "decode"), ("dense", "prefill"), ("dense", "decode"))


SERVER_ENV = "VISOR_SERVER_ID"


def claim_server_id() -> None:
    """In a top-level process (``vllm serve``, a script), name a new server for its children.

    Processes started by ``multiprocessing`` (vLLM's API servers, engine core, workers) keep the
    id they inherited; a top-level process always takes a fresh one, so a server started from
    another one's environment never shares its file.
    """
    if multiprocessing.parent_process() is None:
        envs.export(SERVER_ENV, f"{os.getpid()}-{time.time_ns() % 10**9}")
        envs.export(receipts.SECRET_ENV, secrets.token_hex(16))  # receipt ids' HMAC key


def stats_path(dp_rank: int = 0, server: str | None = None) -> Path:
    """The file of one engine (data-parallel rank ``dp_rank``) of this server."""
    server = server if server is not None else envs.VISOR_SERVER_ID
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", server) or "default"
    return runtime_dir() / f"stats-{safe}-{int(dp_rank)}.bin"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(ring: int) -> int:
    return 8 * (_HEADER + ring * len(EVENT_FIELDS))


def _views(mm, ring: int):
    head = np.frombuffer(mm, dtype=np.float64, count=_HEADER)
    events = np.frombuffer(mm, dtype=np.int64, count=ring * len(EVENT_FIELDS),
                           offset=8 * _HEADER).reshape(ring, len(EVENT_FIELDS))
    return head, events


class StatsWriter:
    """The worker side (one per engine, rank 0). Never raises after construction."""

    def __init__(self, path: str | os.PathLike, ring: int = RING):
        self.path = Path(path)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileExistsError:  # left by a writer that died (killed engine): take it over
            old = StatsReader.open(self.path)
            if old is not None and _alive(int(old.head[_PID])):
                raise
            self.path.unlink()
            fd = os.open(self.path, flags, 0o600)
        try:
            os.ftruncate(fd, _size(ring))
            self._mm = mmap.mmap(fd, _size(ring))
        finally:
            os.close(fd)
        self.head, self.events = _views(self._mm, ring)
        self.head[_RING] = ring
        self.head[_PID] = os.getpid()
        self.head[_MAGIC] = MAGIC  # last: a reader sees a complete header or none
        self._failed = False

    def add(self, visor_prefill=0.0, visor_decode=0.0, dense_prefill=0.0, dense_decode=0.0,
            events=()) -> None:
        """Add FLOPs and request events (tuples in `EVENT_FIELDS` order)."""
        try:
            ring = self.events.shape[0]
            n = int(self.head[_WRITTEN])
            for k, event in enumerate(events):
                self.events[(n + k) % ring] = event
            self.head[_FLOPS] += (visor_prefill, visor_decode, dense_prefill, dense_decode)
            self.head[_WRITTEN] = n + len(events)  # after the events: readers never see a hole
        except Exception:  # noqa: BLE001 - a side channel never fails a step
            if not self._failed:
                self._failed = True
                logger.exception("VISOR: could not record executed FLOPs in %s", self.path)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


class StatsReader:
    """The API server side: `drain` returns what no reader has exported yet."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise PermissionError(f"{self.path} is not a private file of this user "
                                      f"(owner {st.st_uid}, mode {oct(st.st_mode & 0o777)})")
            self._mm = mmap.mmap(fd, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        head = np.frombuffer(self._mm, dtype=np.float64, count=_HEADER)
        if head[_MAGIC] != MAGIC or st.st_size != _size(int(head[_RING])):
            raise ValueError(f"{self.path} is not a VISOR stats file (or not initialised yet)")
        self.head, self.events = _views(self._mm, int(head[_RING]))

    @classmethod
    def open(cls, path) -> StatsReader | None:
        """None while the engine has not created the file yet."""
        try:
            return cls(path)
        except (FileNotFoundError, ValueError):
            return None

    def drain(self) -> tuple[list[float], list[tuple[int, ...]], int] | None:
        """``(flops delta in PHASES order, new events, events lost)``; None if another reader
        holds the lock right now (it exports this round)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        try:
            ring = self.events.shape[0]
            written, done = int(self.head[_WRITTEN]), int(self.head[_EXPORTED])
            lost = max(0, written - done - ring)
            events = [tuple(int(x) for x in self.events[i % ring])
                      for i in range(done + lost, written)]
            flops = self.head[_FLOPS].copy()
            delta = (flops - self.head[_EXPORTED_FLOPS]).tolist()
            self.head[_EXPORTED_FLOPS] = flops
            self.head[_EXPORTED] = written
            return delta, events, lost
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
