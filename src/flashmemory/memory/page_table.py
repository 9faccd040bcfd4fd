"""What is resident: which history page sits in which device slot.

The page table knows nothing about bytes; `pools.py` holds them. Resident pages occupy
slots 0..n-1 with no holes, so a layer's attention input is one contiguous prefix.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlotMove:
    """One page copy that the pools must carry out to realise a new resident set."""

    page: int
    slot: int
    source: str  # "host" (a recall) or "device" (a move from another slot)
    from_slot: int = -1


class PageTable:
    """Maps history page index -> device slot for the resident pages."""

    def __init__(self, capacity_pages: int):
        self.capacity = capacity_pages
        self.slot_of: dict[int, int] = {}

    @property
    def resident(self) -> list[int]:
        """Resident pages in slot order."""
        return [p for p, _ in sorted(self.slot_of.items(), key=lambda kv: kv[1])]

    def __len__(self) -> int:
        return len(self.slot_of)

    def plan(self, wanted: list[int]) -> list[SlotMove]:
        """Change the resident set to `wanted` and return the copies that realise it.

        Kept pages stay in their slots; freed slots are refilled by recalls first, and any
        holes left are closed by moving the last pages down. New pages are placed in
        ascending page order, so a set that only grows stays in history order.
        """
        wanted_set = set(wanted)
        if len(wanted_set) > self.capacity:
            raise ValueError(f"{len(wanted_set)} pages requested but the reserve holds {self.capacity}")
        holes = sorted(slot for page, slot in self.slot_of.items() if page not in wanted_set)
        self.slot_of = {p: s for p, s in self.slot_of.items() if p in wanted_set}
        incoming = sorted(wanted_set - set(self.slot_of))
        moves: list[SlotMove] = []
        next_free = len(self.slot_of) + len(holes)  # first slot past the old occupied prefix
        for page in incoming:
            slot = holes.pop(0) if holes else next_free
            if slot == next_free:
                next_free += 1
            self.slot_of[page] = slot
            moves.append(SlotMove(page, slot, "host"))
        # Close remaining holes by moving the highest-slot pages into them.
        while holes:
            hole = holes.pop(0)
            last_page, last_slot = max(self.slot_of.items(), key=lambda kv: kv[1])
            if last_slot < hole:
                break
            self.slot_of[last_page] = hole
            moves.append(SlotMove(last_page, hole, "device", from_slot=last_slot))
        assert sorted(self.slot_of.values()) == list(range(len(self.slot_of))), "page table has holes"
        return moves

    def clear(self) -> None:
        self.slot_of.clear()
