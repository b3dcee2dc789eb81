"""The writer's cache of instance rows and histories, kept in step with its transactions."""

from __future__ import annotations

import collections
import sqlite3

from dt_trio._core import InstanceState
from dt_trio._proto import orchestrator_service_pb2 as pb

# Running instances whose row and history the writer keeps in memory, and as many rows of
# finished instances.
CACHED_INSTANCES = 4096
CACHED_BYTES = 64 * 1024 * 1024  # ... and at most this much serialized history, and payload

# (row, history, the history's serialized size)
Cached = tuple[InstanceState, tuple[pb.HistoryEvent, ...], int]
# What a write leaves for an instance: a running one's row and history, a finished one's row,
# or nothing (forget it).
Entry = Cached | InstanceState | None


def _payload_size(state: InstanceState) -> int:
    failure = state.failure.ByteSize() if state.failure is not None else 0
    return sum(len(v) for v in (state.input, state.output, state.custom_status) if v) + failure


class InstanceCache:
    """The rows and histories of running instances, and the rows of finished ones, as last
    committed.

    Without it every step's lease (and every hand-over) reads the instance row and parses its
    whole history again, and every client that asks for an instance as it finishes
    (GetInstance, the waits) reads its row again. Only write transactions change it, in the
    writer's turn: what a write puts or drops is pending until its transaction commits
    (`commit`), undone with its savepoint (`undo_to`) or its transaction (`rollback`); reads
    within the transaction see the pending state. One process owns the store, so nothing
    changes a cached instance behind its back. Bounded in entries and in bytes, running and
    finished instances each.
    """

    def __init__(self, capacity: int = CACHED_INSTANCES, max_bytes: int = CACHED_BYTES) -> None:
        self._entries: collections.OrderedDict[str, Cached] = collections.OrderedDict()
        self._bytes = 0  # the histories' total serialized size
        self._finished: collections.OrderedDict[str, InstanceState] = collections.OrderedDict()
        self._finished_bytes = 0  # their inputs, outputs, custom statuses and failures
        self._max_bytes = max_bytes
        self._pending: dict[str, Entry] = {}
        # (instance, had a pending value, that value): how to undo a put
        self._journal: list[tuple[str, bool, Entry]] = []
        self._capacity = capacity

    def get(self, instance_id: str) -> Cached | None:
        """A running instance's row and history, for a step of it (None: read the store)."""
        if instance_id in self._pending:
            entry = self._pending[instance_id]
            return entry if isinstance(entry, tuple) else None
        return self._entries.get(instance_id)

    def row(self, instance_id: str) -> InstanceState | None:
        """The instance's row as committed (None: read the store). Safe from any thread: a
        reader beside a commit finds the row before or after it, or nothing."""
        entry = self._entries.get(instance_id)
        return entry[0] if entry is not None else self._finished.get(instance_id)

    def known(self) -> set[str]:
        """Every instance the cache has something for, committed or pending."""
        return {*self._entries, *self._pending, *self._finished}

    def put(self, instance_id: str, entry: Entry) -> None:
        """Cache `entry` for the instance once the transaction commits: its row and history
        while it runs, its row alone once finished, None to forget it."""
        had = instance_id in self._pending
        self._journal.append((instance_id, had, self._pending.get(instance_id)))
        self._pending[instance_id] = entry

    def mark(self) -> int:
        return len(self._journal)

    def undo_to(self, mark: int) -> None:
        while len(self._journal) > mark:
            instance_id, had, previous = self._journal.pop()
            if had:
                self._pending[instance_id] = previous
            else:
                del self._pending[instance_id]

    def commit(self) -> None:
        for instance_id, entry in self._pending.items():
            old = self._entries.pop(instance_id, None)
            if old is not None:
                self._bytes -= old[2]
            if isinstance(entry, InstanceState):
                # (replaced, not popped first: a reader meanwhile finds the old row or this)
                previous = self._finished.get(instance_id)
                if previous is not None:
                    self._finished_bytes -= _payload_size(previous)
                    self._finished.move_to_end(instance_id)
                self._finished[instance_id] = entry
                self._finished_bytes += _payload_size(entry)
                continue
            dropped = self._finished.pop(instance_id, None)
            if dropped is not None:
                self._finished_bytes -= _payload_size(dropped)
            if entry is not None:
                self._entries[instance_id] = entry
                self._bytes += entry[2]
        while len(self._entries) > self._capacity or self._bytes > self._max_bytes:
            self._bytes -= self._entries.popitem(last=False)[1][2]
        finished = self._finished
        while len(finished) > self._capacity or self._finished_bytes > self._max_bytes:
            self._finished_bytes -= _payload_size(finished.popitem(last=False)[1])
        self.rollback()

    def rollback(self) -> None:
        self._pending.clear()
        self._journal.clear()

    def forget_all(self) -> None:
        self._entries.clear()
        self._bytes = 0
        self._finished.clear()
        self._finished_bytes = 0
        self.rollback()


class WriterConnection(sqlite3.Connection):
    """The writer's connection, carrying the cache its transactions keep (see `cache_of`)."""

    cache: InstanceCache


def cache_of(conn: sqlite3.Connection) -> InstanceCache | None:
    """The cache kept by `conn`'s transactions: the writer's; None on a reader."""
    return conn.cache if isinstance(conn, WriterConnection) else None
