"""Per-request receipts: which SA configuration a request ran, from the worker to the API server.

What. The router decides a request's configuration inside the engine's worker, in the request's
first step; the OpenAI server (another process) must tell the client and count FLOPs. vLLM 0.32
has no response field a model can fill (``kv_transfer_params`` needs a KV connector, which
encoder-decoder models cannot use), so the two processes meet on the local file system:

1. The server middleware (`visor_vllm.serving.middleware`) gives each request a random id in
   ``vllm_xargs["visor_receipt"]`` (``SamplingParams.extra_args``).
2. The worker (`visor_vllm.engine.bridge` + the model) writes ``<dir>/<id>.json`` once, at the
   request's first step: configuration, token counts, budget, checkpoint path.
3. After the response the middleware reads and deletes it (`take`), computes the request's
   FLOPs with `visor_vllm.model.flops` and puts them in the response and in ``/metrics``.

Why a file. It is written before the request's first token exists, so it is always there by
the time the response ends; it works for any number of API server processes; and it costs one
small write per request, never per token.

Footguns.
* ``<dir>`` is `runtime_dir`: ``$VISOR_RECEIPT_DIR`` or ``<tmp>/visor-<uid>``, private (0700,
  ours, no symlink) or refused; engine and server must share a file system (true for
  ``vllm serve`` on one node; not for a remote engine).
* Ids are 32 lowercase hex characters, half of them an HMAC under the server's key
  (``$VISOR_RECEIPT_KEY``, made by the top-level process, `stats.claim_server_id`): anything
  else is refused at admission and ignored by the worker, so a client can neither choose a
  file name nor make the worker write at all.
* Under tensor parallelism only rank 0 writes.
* A preempted request re-runs its first step and rewrites the same receipt.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import tempfile
import time
from pathlib import Path

from visor_vllm import envs

KEY = "visor_receipt"
DIR_ENV = "VISOR_RECEIPT_DIR"
SECRET_ENV = "VISOR_RECEIPT_KEY"  # per server, inherited by its processes (engine/stats.py)
MAX_AGE_S = 3600  # receipts older than this nobody will read: swept (`sweep`)
_ID = re.compile(r"[0-9a-f]{32}")


class RuntimeDirError(RuntimeError):
    """The runtime directory is not private to this user (or cannot be made so)."""


def runtime_dir() -> Path:
    """The private directory receipts and executed-FLOP stats (`visor_vllm.engine.stats`) share.

    ``$VISOR_RECEIPT_DIR`` or ``<tmp>/visor-<uid>``; created 0700 if missing. Anything another
    user could write (not ours, group/other bits, a symlink) is refused with `RuntimeDirError`:
    a file there changes what clients are told and what ``/metrics`` counts.
    """
    folder = Path(envs.VISOR_RECEIPT_DIR or Path(tempfile.gettempdir()) / f"visor-{os.getuid()}")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.lstat()
    except OSError as e:
        raise RuntimeDirError(f"VISOR runtime directory {folder}: {e}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeDirError(
            f"VISOR runtime directory {folder} must be a directory (not a symlink) owned by uid "
            f"{os.getuid()} with mode 0700; it is uid {st.st_uid}, mode {oct(st.st_mode & 0o7777)}. "
            f"Remove it, or point ${DIR_ENV} at a private directory.")
    return folder


def _key() -> bytes:
    """This server's receipt key; a process without one makes one its children inherit."""
    if not envs.VISOR_RECEIPT_KEY:
        envs.export(SECRET_ENV, secrets.token_hex(16))
    return envs.VISOR_RECEIPT_KEY.encode()


def _mac(nonce: str) -> str:
    return hmac.new(_key(), nonce.encode(), hashlib.sha256).hexdigest()[:16]


def new_id() -> str:
    """16 random hex digits + 16 of their HMAC under the server's key: only the server's own
    middleware can make an id the worker accepts, so an id a client sends on any endpoint is
    refused at admission (`visor_vllm.engine.bridge`) and never becomes a file."""
    nonce = secrets.token_hex(8)
    return nonce + _mac(nonce)


def valid_id(value) -> bool:
    return (isinstance(value, str) and _ID.fullmatch(value) is not None
            and hmac.compare_digest(value[16:], _mac(value[:16])))


def sweep(max_age_s: float = MAX_AGE_S) -> int:
    """Delete receipts older than ``max_age_s`` (a request that timed out or was aborted before
    the worker wrote, and so was never taken); returns how many."""
    gone, now = 0, time.time()
    try:
        entries = list(os.scandir(runtime_dir()))
    except (OSError, RuntimeDirError):
        return 0
    for e in entries:
        if e.name.endswith(".json") or e.name.endswith(".tmp"):
            try:
                if now - e.stat(follow_symlinks=False).st_mtime > max_age_s:
                    os.unlink(e.path)
                    gone += 1
            except OSError:
                pass
    return gone


def write(receipt_id: str, record: dict) -> None:
    """Atomically write one receipt (a no-op for an invalid id)."""
    if not valid_id(receipt_id):
        return
    folder = runtime_dir()
    tmp = folder / f".{receipt_id}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record))
    os.replace(tmp, folder / f"{receipt_id}.json")


def take(receipt_id: str) -> dict | None:
    """Read and delete a receipt; None when the worker wrote none (not VISOR, or no step ran)."""
    if not valid_id(receipt_id):
        return None
    try:  # a side channel: a broken runtime dir means no receipt, never a failed request
        path = runtime_dir() / f"{receipt_id}.json"
        record = json.loads(path.read_text())
        path.unlink(missing_ok=True)
    except (OSError, RuntimeDirError, ValueError):  # ValueError: a corrupt file
        return None
    return record


def discard(receipt_id: str) -> None:
    """Delete a receipt nobody will read (a failed or aborted request)."""
    if valid_id(receipt_id):
        try:
            (runtime_dir() / f"{receipt_id}.json").unlink(missing_ok=True)
        except (OSError, RuntimeDirError):
            pass
