"""Values between the host and the device without waiting for the device.

Why: `torch.tensor(values, device="cuda")` copies from pageable memory and then
synchronises the stream, so the host waits for the decode step already queued before
it can prepare the next op. Through pinned memory the copy is queued like a kernel,
and the host's per-step work (sampling settings, penalty ids, the next tokens) overlaps
the step. torch's pinned-memory cache keeps each buffer until its copy has run.

The other way, `tensor.cpu()` is queued behind everything launched before it: a
pipelined engine that launches step N+1 before it reads step N's tokens would wait
for step N+1 too. HostCopy queues the copy when the tokens are launched instead.
"""

from __future__ import annotations

import torch


def to_device(values, device, dtype=None):
    """A tensor of `values` (a list or a CPU tensor) on `device`, queued without a sync."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor's values on their way to the host: on a GPU the copy is queued
    now, behind the ops that compute the tensor and ahead of any launched later, and
    read() waits for it alone. Elsewhere read() copies then (nothing is queued)."""

    def __init__(self, tensor):
        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor

    def read(self) -> list:
        if self._event is not None:
            self._event.synchronize()  # releases the GIL while it waits
            return self._host.tolist()
        return self._host.cpu().tolist()
