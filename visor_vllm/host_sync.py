"""Find the host synchronisations in a region of code: reads of device values from Python.

What. `HostSyncDetector` is a ``TorchDispatchMode`` that records every op in its region that
makes the host wait for (or read) a tensor's value: ``.item()`` / ``int(t)`` / ``float(t)`` /
``bool(t)`` (they reach ``aten._local_scalar_dense``, or ``item``/``is_nonzero`` under
inference mode), ``Tensor.tolist`` (which reaches no dispatcher, so it is patched for the
region), ops whose output shape depends on values (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``), and copies from a
device to the host. `no_host_sync` raises `HostSyncError` at the end of a region that had any.

Why. A step that reads the device back stalls the GPU queue every time (the training step
issue: host-bound steps), and cannot be captured in a CUDA graph. On a CPU-only machine there is
no device, so the detector treats every tensor as a device tensor: code that passes here keeps
its host-side sizes as Python ints, which is the property that carries over to a GPU.

Footguns.
* A dispatch mode sees only ops dispatched on this thread; collectives run by a C++ reducer
  (DDP's buckets) are invisible, as are ops inside custom-op kernels.
* ``TorchDispatchMode`` sees ops after autograd: ``backward()`` inside the region is covered.
* Host-to-device copies from pageable memory (``torch.tensor(x, device="cuda")``) wait for the
  GPU's queue too, but look like any copy to a dispatch mode: on a GPU the detector also turns on
  ``torch.cuda.set_sync_debug_mode("warn")`` for the region and records its warnings.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}
_DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                   aten.unique_consecutive.default, aten.unique_dim.default,
                   aten.masked_scatter.default, aten.argwhere.default}
_INDEX = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class HostSyncError(RuntimeError):
    """A region that must not synchronise with the device did."""


class HostSyncDetector(TorchDispatchMode):
    """Records host synchronisations (see the module docstring) in ``self.found``."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        found, tolist = self.found, self._tolist

        def recorded_tolist(t):
            found.append("Tensor.tolist")
            return tolist(t)
        torch.Tensor.tolist = recorded_tolist
        self._cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # CUDA's own detector also sees what no dispatch mode can: a copy from pageable
            # host memory to the device waits for the queue (torch.tensor(x, device="cuda"))
            self._cuda = (torch.cuda.get_sync_debug_mode(), warnings.catch_warnings(record=True))
            self._caught = self._cuda[1].__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        if self._cuda is not None:
            torch.cuda.set_sync_debug_mode(self._cuda[0])
            self._cuda[1].__exit__(None, None, None)
            for w in self._caught:
                if "synchroniz" in str(w.message):
                    self.found.append(f"CUDA: {str(w.message).splitlines()[0]}")
                else:  # not ours: let it through
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = sync_of(func, args, kwargs)
        if found:
            self.found.append(found)
        return func(*args, **kwargs)


def sync_of(func, args, kwargs) -> str | None:
    """What makes this op call a host synchronisation (module docstring), or None."""
    if func in _READS or func in _DATA_DEPENDENT:
        return str(func)
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if func in _INDEX and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                              for i in args[1] if i is not None):
        return f"{func} with a boolean mask"
    if func in (aten._to_copy.default, aten.copy_.default):
        src = args[1] if func is aten.copy_.default else args[0]
        dst = args[0].device if func is aten.copy_.default else kwargs.get("device")
        if (isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta")
                and dst is not None and torch.device(dst).type == "cpu"):
            return f"{func} from {src.device} to the host"
    return None


@contextlib.contextmanager
def no_host_sync(what: str = "this region"):
    """Run the body under `HostSyncDetector`; raise `HostSyncError` listing what it found."""
    with HostSyncDetector() as det:
        yield det
    if det.found:
        counts: dict[str, int] = {}
        for f in det.found:
            counts[f] = counts.get(f, 0) + 1
        raise HostSyncError(f"{what} synchronised with the device: "
                            + ", ".join(f"{k} x{v}" for k, v in counts.items()))
