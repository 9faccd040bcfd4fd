"""The disk tier: a sequence's history beyond its host cap lives in a spill file; the host is its page cache.

`SpilledMirror` stands where a `pools.HostMirror` stands when a sequence's history would not fit
`EngineConfig.host_memory`. It holds at most `host_bytes // page_bytes` pages in host slots
([slots, 2, layers, kv_heads, page_size, head_dim]: one page's K and V of every layer are one
contiguous record). A page that must leave the host to make room is written, whole, to its
page-aligned place in the spill file (`page * record_stride`; the stride is the record rounded up
to 4096 bytes), unless the file already holds an identical copy; a page read back keeps its copy
in the file. Reads and writes are explicit `os.preadv`/`os.pwritev` of whole records straight into
and out of the slots (docs/memory-tiers.md has the measurement that chose this over a memory map).
After each read the kernel is told to drop its own cached copy (`POSIX_FADV_DONTNEED`), so the
host holds a page once, in the slots that `allocated_bytes` counts.

Prefetch: at a cycle boundary the scheduler names the pages the policy ranked next
(`prefetch`); a background thread reads those that are on disk into slots while the cycle
decodes, evicting least recently used pages that are not predicted. The next access from the
engine (the next boundary) first waits for that thread, so the mirror has one user at a time.
Recalls that find a prefetched page count as prefetch hits; recalls that must read the file
then are prefetch misses, which the boundary reads all at once before its recalls (`fetch`,
several reads in flight). Every disk read and write is logged in the sequence's `TransferLog`
with its decode step and kind.

The file is created at the first spill and removed by `close()` (the engine calls it when the
sequence ends or is cancelled), or when the mirror is garbage-collected.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import uuid
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch

from .accounting import TransferLog
from .pools import KVShape

ALIGN = 4096  # file offsets and record strides are multiples of this
READERS = 8   # reads in flight when a boundary fetches the pages it needs from disk (measured: ~2.7x faster than 1)


class SpillError(ValueError):
    """A disk tier that cannot work: a host cap below the working set, or a spill folder that cannot be written."""


def check_spill_folder(folder: str | os.PathLike) -> Path:
    """The spill folder, created if missing; SpillError if a file cannot be created in it."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise SpillError(f"the spill folder {path} is not writable ({exc.strerror or exc}); "
                         "pass a writable spill_dir (--spill-dir)") from None
    return path


def min_host_pages(page_size: int, prefill_chunk: int, open_pages: int) -> int:
    """Host pages a capped mirror needs at once: one prefill piece, written layer by layer, plus one cycle's
    open pages (fewer would write and re-read the same pages for every layer)."""
    return math.ceil(prefill_chunk / page_size) + 1 + open_pages


def _remove(fd: int, path: str) -> None:
    os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class SpilledKeys:
    """The keys of a `SpilledMirror`, indexed like a host mirror's key tensor: `keys[rows, heads, start:stop]`
    gives [rows, heads, stop - start, head_dim] (cached pages from the host, the others read from the file)."""

    def __init__(self, mirror: "SpilledMirror"):
        self.mirror = mirror

    @property
    def shape(self) -> torch.Size:
        s = self.mirror.shape
        return torch.Size((s.layers, s.kv_heads, self.mirror.capacity, s.head_dim))

    def __getitem__(self, index: tuple) -> torch.Tensor:
        rows, heads, tokens = index
        start, stop, stride = tokens.indices(self.mirror.capacity)
        if stride != 1:
            raise IndexError("spilled keys are read in contiguous token ranges")
        return self.mirror.read_keys(rows, heads, start, stop)


class SpilledMirror:
    """One sequence's history: at most `host_bytes` of it in host page slots, the rest in a spill file."""

    spills = True

    def __init__(self, shape: KVShape, capacity_tokens: int, page_size: int, host_bytes: int,
                 folder: str | os.PathLike, pin: bool = False):
        self.shape = shape
        self.capacity = capacity_tokens
        self.page_size = page_size
        self.length = 0  # tokens of history written so far
        self.page_bytes = page_size * shape.bytes_per_token
        self.record_stride = -(-self.page_bytes // ALIGN) * ALIGN
        n_slots = host_bytes // self.page_bytes
        if n_slots < 1:
            raise SpillError(f"a host cap of {host_bytes} bytes holds no page of {self.page_bytes} bytes")
        size = (n_slots, 2, shape.layers, shape.kv_heads, page_size, shape.head_dim)
        self._slots = torch.empty(size, dtype=shape.dtype, pin_memory=pin)
        self._raw = self._slots.view(n_slots, -1).view(torch.uint8)  # [slots, page_bytes]
        self._slot_of: dict[int, int] = {}
        self._free = list(range(n_slots - 1, -1, -1))
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached pages, least recently used first
        self._on_disk: set[int] = set()   # pages whose record in the file is their current content
        self._dirty: set[int] = set()     # cached pages written since their record (if any) was written
        self._prefetched: set[int] = set()
        self._predicted: frozenset[int] = frozenset()
        self.path = Path(folder) / f"fm-{os.getpid()}-{uuid.uuid4().hex}.kv"
        self._fd: int | None = None
        self._finalizer: weakref.finalize | None = None
        self.log = TransferLog()
        self._clock: Callable[[], int] = lambda: 0
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._error: BaseException | None = None

    @classmethod
    def over_file(cls, shape: KVShape, path: str | os.PathLike, length: int, capacity_tokens: int, page_size: int,
                  host_bytes: int) -> "SpilledMirror":
        """A mirror whose first `length` tokens are already in the spill file `path` (records of
        `page_size` tokens at `page * record_stride`; benchmarks write a synthetic history this way).
        The mirror owns the file from now on and removes it on `close()`."""
        mirror = cls(shape, capacity_tokens, page_size, host_bytes, Path(path).parent)
        mirror.path = Path(path)
        mirror._fd = os.open(mirror.path, os.O_RDWR)
        mirror._finalizer = weakref.finalize(mirror, _remove, mirror._fd, str(mirror.path))
        mirror._on_disk = set(range(math.ceil(length / page_size)))
        mirror.length = length
        return mirror

    # ------------------------------------------------------------------ ownership and measurements
    def attach(self, log: TransferLog, clock: Callable[[], int]) -> None:
        """Log disk traffic from now on into `log`, each event with the step `clock()` returns."""
        self.join()
        self.log, self._clock = log, clock

    def close(self) -> None:
        """Stop prefetching and remove the spill file (the host slots go with the mirror)."""
        self._cancel.set()
        self.join()
        if self._finalizer is not None:
            self._finalizer()
        self._fd = None

    @property
    def nbytes(self) -> int:
        """Bytes of the history held in host slots now."""
        return len(self._slot_of) * self.page_bytes

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the storage of the host slots (measured; never more than the cap)."""
        return self._slots.untyped_storage().nbytes()

    @property
    def disk_bytes(self) -> int:
        """Bytes the spill file occupies on disk (measured: its allocated blocks)."""
        return os.fstat(self._fd).st_blocks * 512 if self._fd is not None else 0

    @property
    def spilled_pages(self) -> list[int]:
        """Pages that have a record in the spill file."""
        return sorted(self._on_disk)

    @property
    def keys(self) -> SpilledKeys:
        """The history's keys, indexed like `HostMirror.keys` (what policies read)."""
        return SpilledKeys(self)

    # ------------------------------------------------------------------ file I/O (whole records or halves)
    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            self._finalizer = weakref.finalize(self, _remove, self._fd, str(self.path))
        return self._fd

    def _pread(self, buffer: torch.Tensor, offset: int) -> int:
        view = buffer.view(-1).view(torch.uint8).numpy()
        n = os.preadv(self._fd, [view], offset)
        if n != view.nbytes:
            raise OSError(f"short read from the spill file {self.path}: {n} of {view.nbytes} bytes at {offset}")
        os.posix_fadvise(self._fd, offset, n, os.POSIX_FADV_DONTNEED)
        return n

    def _read_record(self, page: int, slot: int, kind: str, step: int | None = None) -> None:
        n = self._pread(self._raw[slot], page * self.record_stride)
        self.log.disk_read(n, self._clock() if step is None else step, kind, page)

    def _write_record(self, page: int, slot: int) -> None:
        fd, view = self._file(), self._raw[slot].numpy()
        n = os.pwritev(fd, [view], page * self.record_stride)
        if n != view.nbytes:
            raise OSError(f"short write to the spill file {self.path}: {n} of {view.nbytes} bytes")
        self._on_disk.add(page)
        self._dirty.discard(page)
        self.log.disk_write(n, self._clock(), page)

    def _read_part(self, page: int, part: int, layer: int | None) -> torch.Tensor:
        """K (part 0) or V (part 1) of one page from the file: every layer [layers, heads, P, hd], or one."""
        s = self.shape
        shape = (s.kv_heads, self.page_size, s.head_dim) if layer is not None else \
            (s.layers, s.kv_heads, self.page_size, s.head_dim)
        out = torch.empty(shape, dtype=s.dtype)
        layer_bytes = out.nbytes if layer is not None else out.nbytes // s.layers
        offset = page * self.record_stride + part * self.page_bytes // 2 + (layer or 0) * layer_bytes
        self.log.disk_read(self._pread(out, offset), self._clock(), "read", page)
        return out

    # ------------------------------------------------------------------ the page cache
    def _victim(self, avoid_predicted: bool) -> int | None:
        """The least recently used cached page that may leave: never the unfinished last page; a predicted
        page only when nothing else can (and never when `avoid_predicted`)."""
        open_page = self.length // self.page_size if self.length % self.page_size else None
        fallback = None
        for page in self._lru:
            if page == open_page:
                continue
            if page not in self._predicted:
                return page
            if fallback is None:
                fallback = page
        return None if avoid_predicted else fallback

    def _take_slot(self, avoid_predicted: bool = False) -> int | None:
        if self._free:
            return self._free.pop()
        page = self._victim(avoid_predicted)
        if page is None:
            if avoid_predicted:
                return None
            raise SpillError(f"the host cap ({self._slots.shape[0]} pages) cannot hold the pages needed at once; "
                             "raise host_memory")
        slot = self._slot_of.pop(page)
        del self._lru[page]
        self._prefetched.discard(page)
        if page in self._dirty or page not in self._on_disk:
            self._write_record(page, slot)
        return slot

    def _place(self, page: int, slot: int) -> None:
        self._slot_of[page] = slot
        self._lru[page] = None

    def _slot(self, page: int, write: bool = False, recall: bool = False) -> int:
        """The host slot holding `page`, read from the file if it is only there (a synchronous read)."""
        slot = self._slot_of.get(page)
        if slot is not None:
            self._lru.move_to_end(page)
            if recall and page in self._prefetched:
                self.log.prefetch_hit(self._clock(), page)
        else:
            slot = self._take_slot()
            if page in self._on_disk:
                self._read_record(page, slot, "miss" if recall else "read")
            self._place(page, slot)
        self._prefetched.discard(page)
        if write:
            self._dirty.add(page)
        return slot

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(page, first token, end token) of each page's part of [start, stop)."""
        P = self.page_size
        pos = start
        while pos < stop:
            page = pos // P
            end = min(stop, (page + 1) * P)
            yield page, pos, end
            pos = end

    # ------------------------------------------------------------------ what the runtime calls
    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write [kv_heads, n, head_dim] states at token offset `start` of one layer."""
        self.join()
        for page, lo, hi in self._pieces(start, start + k.shape[-2]):
            slot, a = self._slot(page, write=True), page * self.page_size
            self._slots[slot, 0, layer, :, lo - a:hi - a].copy_(k[:, lo - start:hi - start])
            self._slots[slot, 1, layer, :, lo - a:hi - a].copy_(v[:, lo - start:hi - start])

    def layer_view(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, kv_heads, length, head_dim] copies of one layer's first `length` tokens (a dense forward's keys)."""
        self.join()
        ks, vs = [], []
        for page, lo, hi in self._pieces(0, length):
            slot, a = self._slot_of.get(page), page * self.page_size
            if slot is not None:
                k, v = self._slots[slot, 0, layer], self._slots[slot, 1, layer]
            else:
                k, v = self._read_part(page, 0, layer), self._read_part(page, 1, layer)
            ks.append(k[:, lo - a:hi - a])
            vs.append(v[:, lo - a:hi - a])
        return torch.cat(ks, 1)[None], torch.cat(vs, 1)[None]

    def span(self, start: int, n: int, write: bool = False, recall: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[layers, kv_heads, n, head_dim] views of tokens [start, start + n) of one page, in a host slot until
        the next call (`write`: about to be overwritten; `recall`: on its way to the device)."""
        self.join()
        page, offset = divmod(start, self.page_size)
        if offset + n > self.page_size:
            raise ValueError(f"a span lies within one page: {n} tokens from offset {offset} of {self.page_size}")
        slot = self._slot(page, write=write, recall=recall)
        return self._slots[slot, 0, :, :, offset:offset + n], self._slots[slot, 1, :, :, offset:offset + n]

    def read_keys(self, rows, heads, start: int, stop: int) -> torch.Tensor:
        """Keys [rows, heads, start:stop] (a copy): cached pages from the host, the others read from the file
        without entering the cache (an index build reads the whole history once)."""
        self.join()
        parts = []
        for page, lo, hi in self._pieces(start, stop):
            slot, a = self._slot_of.get(page), page * self.page_size
            keys = self._slots[slot, 0] if slot is not None else self._read_part(page, 0, None)
            parts.append(keys[rows, heads, lo - a:hi - a])
        if not parts:
            s = self.shape
            return torch.empty((s.layers, s.kv_heads, 0, s.head_dim), dtype=s.dtype)[rows, heads]
        return torch.cat(parts, -2)

    def fetch(self, pages: list[int]) -> None:
        """Read the `pages` that are only on disk into host slots now, up to `READERS` reads at once (the
        recalls of a boundary that the prefetch did not cover: prefetch misses). Pages that do not fit beside
        the others are left to the recall path, which reads them one at a time."""
        self.join()
        todo = [p for p in dict.fromkeys(pages) if p not in self._slot_of and p in self._on_disk]
        if len(todo) < 2:
            return
        kept, self._predicted = self._predicted, self._predicted | frozenset(pages)
        slots: list[int] = []
        try:
            for _ in todo:
                slot = self._take_slot(avoid_predicted=True)
                if slot is None:
                    break
                slots.append(slot)
            todo = todo[: len(slots)]
            if not todo:
                return
            with ThreadPoolExecutor(min(READERS, len(todo)), thread_name_prefix="flashmemory-fetch") as pool:
                sizes = list(pool.map(lambda ps: self._pread(self._raw[ps[1]], ps[0] * self.record_stride),
                                      zip(todo, slots)))
        except BaseException:
            self._free.extend(slots)
            raise
        finally:
            self._predicted = kept
        step = self._clock()
        for page, slot, n in zip(todo, slots, sizes):
            self.log.disk_read(n, step, "miss", page)
            self._place(page, slot)

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, pages: list[int]) -> None:
        """Read the predicted `pages` that are only on disk into host slots, in the background, in the given
        order (best first); predicted pages are not evicted to make room for each other."""
        self.join()
        self._predicted = frozenset(pages)
        todo = [p for p in pages if p not in self._slot_of and p in self._on_disk]
        if todo:
            self._cancel.clear()
            self._thread = threading.Thread(target=self._prefetch, args=(todo, self._clock()), name="flashmemory-prefetch",
                                            daemon=True)
            self._thread.start()

    def _prefetch(self, pages: list[int], step: int) -> None:
        """The background reads (logged with the step of the boundary that asked for them)."""
        try:
            for page in pages:
                if self._cancel.is_set():
                    return
                slot = self._take_slot(avoid_predicted=True)
                if slot is None:  # the cap is full of predicted pages
                    return
                self._read_record(page, slot, "prefetch", step)
                self._place(page, slot)
                self._prefetched.add(page)
        except BaseException as exc:  # raised again in the engine's thread at the next join
            self._error = exc

    def join(self) -> None:
        """Wait for the background prefetch (if any) to end; raise what it failed with."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
