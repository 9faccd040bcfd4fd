"""What is resident for one sequence: which of its history pages sits in which device slot.

The page table knows nothing about bytes (`pools.py` holds them) nor about which slots are
free (`block_pool.py`). Slots are any ids the block pool hands out; attention reads the
resident pages through a gather index built in history order, so no compaction is needed.
"""

from __future__ import annotations


class PageTable:
    """Maps history page index -> device slot for one sequence's pages on the device."""

    def __init__(self) -> None:
        self.slot_of: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.slot_of)

    @property
    def pages(self) -> list[int]:
        """Pages on the device, in history order."""
        return sorted(self.slot_of)

    def slots(self, pages: list[int]) -> list[int]:
        return [self.slot_of[p] for p in pages]

    def diff(self, wanted: list[int]) -> tuple[dict[int, int], list[int]]:
        """(pages to drop with their slots, pages to bring in) to make the resident set `wanted`."""
        wanted_set = set(wanted)
        drop = {p: s for p, s in self.slot_of.items() if p not in wanted_set}
        incoming = sorted(wanted_set - set(self.slot_of))
        return drop, incoming

    def drop(self, pages: list[int]) -> None:
        for p in pages:
            del self.slot_of[p]

    def assign(self, pages: list[int], slots: list[int]) -> None:
        if len(pages) != len(slots):
            raise ValueError(f"{len(pages)} pages for {len(slots)} slots")
        self.slot_of.update(zip(pages, slots))

    def clear(self) -> list[int]:
        """Forget every page; return the slots they held."""
        slots = list(self.slot_of.values())
        self.slot_of.clear()
        return slots
