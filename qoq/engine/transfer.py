"""Host <-> device copies that never wait for the device (what lets async scheduling overlap).

A plain `torch.tensor(data, device="cuda")` or `.to("cuda")` from pageable memory ends in a stream
synchronize: the CPU would wait for every step already queued. Staged through pinned memory
(PyTorch's caching host allocator, which keeps the block until the copy is done), the copy is
queued on the stream and the call returns at once. On the CPU these are plain tensors.
"""

from __future__ import annotations

import torch


def to_device(data: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A device tensor of `data` (a list or a CPU tensor), copied without waiting for the device."""
    host = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class DeviceToHost:
    """Start copying a device tensor to the host now; `tolist()` waits for that copy only."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event: torch.cuda.Event | None = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = tensor, None

    def tolist(self) -> list:
        if self.event is not None:
            self.event.synchronize()  # releases the GIL while it waits
        return self.host.tolist()
