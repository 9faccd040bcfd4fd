"""Which device page slots are free: ids only, no tensors (the bytes live in `pools.DevicePool`).

Admission works on reservations: a sequence reserves the most pages it may ever hold (its
resident cap plus its open region) before it starts, so a running sequence never waits for a
page. Slots are then allocated and freed within that reservation as its resident set changes,
and `used` counts the slots that hold a page now.
"""

from __future__ import annotations

from collections import deque


class PoolExhausted(RuntimeError):
    """More pages were asked for than the pool (or a reservation) holds."""


class BlockPool:
    """Free list of page slots plus the count of reserved slots."""

    def __init__(self, n_slots: int):
        self.n_slots = 0
        self._free: deque[int] = deque()
        self.reserved = 0
        self.grow(n_slots)

    def grow(self, n_slots: int) -> None:
        """Add slots up to `n_slots` (their ids follow the existing ones)."""
        self._free.extend(range(self.n_slots, n_slots))
        self.n_slots = max(self.n_slots, n_slots)

    @property
    def used(self) -> int:
        return self.n_slots - len(self._free)

    @property
    def unreserved(self) -> int:
        return self.n_slots - self.reserved

    def reserve(self, n: int) -> bool:
        """Reserve n slots for a new sequence if they fit; False (and nothing reserved) otherwise."""
        if n > self.unreserved:
            return False
        self.reserved += n
        return True

    def unreserve(self, n: int) -> None:
        if n > self.reserved:
            raise PoolExhausted(f"releasing {n} reserved slots, only {self.reserved} are reserved")
        self.reserved -= n

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"{n} slots requested, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, slots: list[int]) -> None:
        self._free.extend(slots)
