"""The host-synchronisation detector sees what it must, and stays quiet on clean code."""

import pytest
import torch

from visor_vllm.host_sync import HostSyncDetector, HostSyncError, no_host_sync


@pytest.mark.parametrize("read, found", [
    (lambda x: float(x.sum()), "aten._local_scalar_dense.default"),
    (lambda x: x.tolist(), "Tensor.tolist"),
    (lambda x: x[x > 0], "with a boolean mask"),
    (lambda x: x.nonzero(), "aten.nonzero.default"),
    (lambda x: torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3])),
     "repeat_interleave without output_size"),
    (lambda x: bool(x.any()), "aten.is_nonzero.default|aten._local_scalar_dense.default"),
])
def test_each_kind_of_read_back_is_found(read, found):
    x = torch.randn(5)
    with HostSyncDetector() as det:
        read(x)
    assert any(f in s for s in det.found for f in found.split("|")), det.found


def test_clean_code_passes_and_a_read_raises_with_counts():
    x = torch.randn(4, 4, requires_grad=True)
    with no_host_sync("clean"):
        y = (x @ x).softmax(-1).sum()
        y.backward()
        torch.nn.utils.clip_grads_with_norm_([x], 1.0, x.grad.norm())
    with pytest.raises(HostSyncError, match=r"the step synchronised .*_local_scalar_dense.* x2"):
        with no_host_sync("the step"):
            x.sum().item()
            int(x.sum())
    assert torch.Tensor.tolist is not None and torch.tensor([1]).tolist() == [1]  # restored
