"""The byte mover: applies copies between a sequence's host mirror and the device pool.

It decides nothing. Under CUDA the copies run on a side stream that the compute stream
waits on before the next forward; on a CPU they are plain copies.
"""

from __future__ import annotations

import contextlib

import torch

from .accounting import TransferLog
from .pools import DevicePool, HostMirror


class PageMover:
    """Recalls (host -> device) and offloads (device -> host), each logged with its decode step."""

    def __init__(self, pool: DevicePool):
        self.pool = pool
        device = pool.device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def copies(self):
        """Scope for a batch of copies; on exit the compute stream waits for them and the host may read."""
        if self._stream is None:
            yield
            return
        compute = torch.cuda.current_stream(self.pool.device)
        compute.synchronize()  # pending writes to the pinned mirror, and reads of slots about to be reused
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            yield
        compute.wait_stream(self._stream)
        self._stream.synchronize()

    def recall(self, host: HostMirror, host_start: int, slot: int, offset: int, n: int,
               log: TransferLog, step: int) -> None:
        k, v = host.span(host_start, n, recall=True)
        log.recall(self.pool.load(slot, offset, k, v, self._async(host)), step)

    def offload(self, host: HostMirror, host_start: int, slot: int, offset: int, n: int,
                log: TransferLog, step: int) -> None:
        k, v = host.span(host_start, n, write=True)
        log.offload(self.pool.store(slot, offset, k, v, self._async(host)), step)

    def _async(self, host: HostMirror) -> bool:
        """Copies run asynchronously on the side stream, except with a spilled mirror's host slot, which
        the next page of the same boundary may reuse."""
        return self._stream is not None and not host.spills
