"""Record a step's ops once, replay them without its Python: a CUDA graph's contract, on CPU.

What. Under `record`, every op a region dispatches is kept with its arguments and outputs
(`Recording`). `Recording.replay` runs the same ops again, in order, and nothing else: an
argument that an earlier op of the region made is that op's output *of this replay*; every
other tensor is the very object the recorded op got (weights, KV caches, the model's persistent
state, the step's input buffers); every other argument (sizes, Python ints, flags) is the
recorded value. That is what a captured CUDA graph is: fixed kernels with fixed arguments over
fixed buffers, whose inputs are updated in place before each replay, with no Python run.

Why. vLLM replays an encoder-decoder model's decode steps as full CUDA graphs
(``FULL_DECODE_ONLY``). A step that derives anything per step in Python -- a size or a flag
read from the device, a value kept in a Python attribute, a tensor built from a list -- is right
while recorded and wrong when replayed for another batch. No GPU build of vLLM runs in this
project; replaying a recorded step for other batches and comparing with the eager step shows the
same mistakes on CPU (`tests/engine/test_graph_replay.py`).

Footguns.
* Host synchronisations (`visor_vllm.host_sync.sync_of`, ``Tensor.tolist``) are recorded as
  ``violations``: a CUDA graph cannot capture them, and `Recording.replay` refuses to run.
* A dispatch mode does not see into a custom op: an op recorded whole is *called* again at
  replay, so its Python runs again. Record VISOR's own ops as their Python bodies (the test does)
  so that only their kernels are kept; vLLM's attention ops stay whole (on a GPU vLLM makes its
  own attention metadata graph-safe).
* Replayed outputs are new tensors, where a graph writes the addresses it captured: a Python
  attribute that kept a tensor of the recorded step still holds the recorded values.
* Tensors made outside the dispatcher (``torch.tensor(list)``: its ``lift_fresh``) are
  constants of the recording, as a host-to-device copy captured in a graph would be.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._pytree import tree_flatten, tree_map

from visor_vllm.host_sync import HostSyncDetector


class ReplayError(RuntimeError):
    """A recording that a CUDA graph could not have captured."""


class _Made:
    """An argument that op ``node`` of the recording made (its ``index``-th tensor output)."""

    __slots__ = ("node", "index")

    def __init__(self, node: int, index: int):
        self.node, self.index = node, index


class Recording:
    """The ops of one recorded region (`record`); `replay` runs them again."""

    def __init__(self):
        self.ops: list[tuple] = []       # (func, args, kwargs) with `_Made` for made tensors
        self.made: dict[int, _Made] = {}  # id(tensor) -> where it was made
        self.keep: list[torch.Tensor] = []  # made tensors stay alive: their ids stay unique
        self.inputs: set[int] = set()  # ids of the tensors not made here that ops read
        self.violations: list[str] = []
        self.result = None

    def _template(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        made = self.made.get(id(x))
        if made is None:
            self.inputs.add(id(x))
            return x
        return made

    def reads(self, t: torch.Tensor) -> bool:
        """Whether a recorded op reads ``t`` itself (a buffer the replay depends on)."""
        return id(t) in self.inputs

    def add(self, func, args, kwargs, out) -> None:
        node = len(self.ops)
        self.ops.append((func, *tree_map(self._template, (args, kwargs))))
        flat, _ = tree_flatten(out)
        for j, t in enumerate(flat):
            if isinstance(t, torch.Tensor):
                self.made[id(t)] = _Made(node, j)
                self.keep.append(t)

    def finish(self, result) -> None:
        self.result = tree_map(self._template, result)

    def replay(self):
        """Run the recorded ops again; returns the region's result made by this replay."""
        if self.violations:
            raise ReplayError("the recorded region synchronised with the device ("
                              + ", ".join(sorted(set(self.violations)))
                              + "): a CUDA graph cannot capture it")
        outs: list[list] = []

        def resolve(x):
            return outs[x.node][x.index] if isinstance(x, _Made) else x

        for func, args, kwargs in self.ops:
            out = func(*tree_map(resolve, args), **tree_map(resolve, kwargs))
            outs.append(tree_flatten(out)[0])
        return tree_map(resolve, self.result)


class _Recorder(HostSyncDetector):
    def __init__(self, recording: Recording):
        super().__init__()
        self.recording = recording
        self.found = recording.violations  # Tensor.tolist lands here too

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = super().__torch_dispatch__(func, types, args, kwargs)  # records host syncs
        self.recording.add(func, args, kwargs, out)
        return out


@contextlib.contextmanager
def record():
    """``with record() as rec: out = step(...); rec.finish(out)`` -- then ``rec.replay()``."""
    rec = Recording()
    with _Recorder(rec):
        yield rec
