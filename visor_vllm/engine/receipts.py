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
* Ids are 32 lowercase hex characters; anything else is ignored by the worker, so a client
  cannot make the worker write outside the directory.
* Under tensor parallelism only rank 0 writes.
* A preempted request re-runs its first step and rewrites the same receipt.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import uuid
from pathlib import Path

KEY = "visor_receipt"
DIR_ENV = "VISOR_RECEIPT_DIR"
_ID = re.compile(r"[0-9a-f]{32}")


class RuntimeDirError(RuntimeError):
    """The runtime directory is not private to this user (or cannot be made so)."""


def runtime_dir() -> Path:
    """The private directory receipts and executed-FLOP stats (`visor_vllm.engine.stats`) share.

    ``$VISOR_RECEIPT_DIR`` or ``<tmp>/visor-<uid>``; created 0700 if missing. Anything another
    user could write (not ours, group/other bits, a symlink) is refused with `RuntimeDirError`:
    a file there changes what clients are told and what ``/metrics`` counts.
    """
    folder = Path(os.environ.get(DIR_ENV) or Path(tempfile.gettempdir()) / f"visor-{os.getuid()}")
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


receipt_dir = runtime_dir


def new_id() -> str:
    return uuid.uuid4().hex


def valid_id(value) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def write(receipt_id: str, record: dict) -> None:
    """Atomically write one receipt (a no-op for an invalid id)."""
    if not valid_id(receipt_id):
        return
    folder = receipt_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{receipt_id}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / f"{receipt_id}.json")


def take(receipt_id: str) -> dict | None:
    """Read and delete a receipt; None when the worker wrote none (not VISOR, or no step ran)."""
    if not valid_id(receipt_id):
        return None
    path = receipt_dir() / f"{receipt_id}.json"
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    path.unlink(missing_ok=True)
    return record


def discard(receipt_id: str) -> None:
    """Delete a receipt nobody will read (a failed or aborted request)."""
    if valid_id(receipt_id):
        (receipt_dir() / f"{receipt_id}.json").unlink(missing_ok=True)
