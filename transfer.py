"""Host values to device tensors without waiting for the device.

Why: `torch.tensor(values, device="cuda")` copies from pageable memory and then
synchronises the stream, so the host waits for the decode step already queued before
it can prepare the next op. Through pinned memory the copy is queued like a kernel,
and the host's per-step work (sampling settings, penalty ids, the next tokens) overlaps
the step. torch's pinned-memory cache keeps each buffer until its copy has run.
"""

from __future__ import annotations

import torch


def to_device(values, device, dtype=None):
    """A tensor of `values` (a list or a CPU tensor) on `device`, queued without a sync."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
