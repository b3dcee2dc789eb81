"""The remote executor: hands work items to SDK workers connected over GetWorkItems.

A processor calls `execute(work_item)` and gets the worker's response back, or `WorkAbandoned`.
Each connected worker runs `stream()`; items travel through one unbuffered trio memory channel,
so an item goes to whichever worker stream is ready first. Every item sent carries a fresh
completion token; `complete()`/`abandon()` find it by that token. When a stream ends for any
reason, every item it held and had not completed is abandoned at once, so the processor
releases the lease and the item is redelivered to another worker.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from dt_trio._errors import InvalidRequest, StoreUnavailable, UnknownWorkItem
from dt_trio._proto import orchestrator_service_pb2 as pb

log = logging.getLogger(__name__)

R = TypeVar("R")

# The SDKs treat 120 s without a message on the stream as a silent disconnect; ping well inside.
HEALTH_PING_INTERVAL = 30.0


class WorkAbandoned(Exception):
    """The worker gave the item back, or its stream ended before it answered."""


@dataclass(eq=False)
class Pending(Generic[R]):
    """One work item in the hands of a worker."""

    token: str
    work_item: pb.WorkItem
    answered: trio.Event = field(default_factory=trio.Event)
    committed: trio.Event = field(default_factory=trio.Event)
    response: R | None = None
    abandoned: bool = False
    commit_error: BaseException | None = None

    def abandon(self) -> None:
        if not self.answered.is_set():
            self.abandoned = True
            self.answered.set()

    def ack(self, error: BaseException | None = None) -> None:
        """Tell the completing rpc how its commit went."""
        self.commit_error = error
        self.committed.set()


class RemoteExecutor:
    """The bridge between the processors and the workers' GetWorkItems streams."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Pending[object]](0)
        self._pending: dict[str, Pending[object]] = {}
        self._streams = itertools.count(1)
        self.connected = 0

    # -- processor side --------------------------------------------------------------------

    async def execute(self, work_item: pb.WorkItem) -> Pending[object]:
        """Send `work_item` to a worker and wait for its answer.

        Returns the answered `Pending`; the caller must `ack()` it once the result is committed
        (or failed to commit). Raises `WorkAbandoned`. On cancellation the item is withdrawn.
        """
        token = secrets.token_hex(12)
        work_item.completionToken = token
        pending: Pending[object] = Pending(token, work_item)
        self._pending[token] = pending
        try:
            await self._send.send(pending)
            await pending.answered.wait()
        except BaseException:
            pending.abandon()
            pending.ack(
                StoreUnavailable("the sidecar withdrew the work item; it will be redelivered")
            )
            self._pending.pop(token, None)
            raise
        if pending.abandoned:
            self._pending.pop(token, None)
            raise WorkAbandoned(f"work item {token} was abandoned")
        return pending

    def finish(self, pending: Pending[object], error: BaseException | None = None) -> None:
        """Forget the item and release the rpc that completed it."""
        self._pending.pop(pending.token, None)
        pending.ack(error)

    # -- rpc side --------------------------------------------------------------------------

    def lookup(self, token: str) -> Pending[object]:
        if not token:
            raise InvalidRequest("completionToken is empty")
        pending = self._pending.get(token)
        if pending is None or pending.answered.is_set():
            raise UnknownWorkItem(
                f"no work item is waiting for completion token '{token}': it is unknown, "
                "already completed or abandoned, or was redelivered after its stream ended"
            )
        return pending

    async def complete(self, pending: Pending[object], response: object) -> None:
        """Deliver a worker's answer and wait until it is committed."""
        if pending.answered.is_set():
            raise UnknownWorkItem(f"work item '{pending.token}' was already answered")
        pending.response = response
        pending.answered.set()
        with trio.CancelScope(shield=True):
            # The commit happens whether or not the caller stays; its outcome is the answer.
            await pending.committed.wait()
        if pending.commit_error is not None:
            raise pending.commit_error

    def abandon(self, token: str) -> None:
        self.lookup(token).abandon()

    async def stream(self, worker: str) -> AsyncIterator[pb.WorkItem]:
        """The work items of one connected worker, with health pings while idle."""
        number = next(self._streams)
        held: dict[str, Pending[object]] = {}
        receive = self._receive.clone()
        self.connected += 1
        log.info("worker stream %d connected (%s)", number, worker or "anonymous")
        try:
            while True:
                pending: Pending[object] | None = None
                with trio.move_on_after(HEALTH_PING_INTERVAL):
                    pending = await receive.receive()
                if pending is None:
                    yield pb.WorkItem(healthPing=pb.HealthPing())
                    continue
                if pending.answered.is_set():
                    continue  # withdrawn while queued
                held[pending.token] = pending
                for token in [t for t, p in held.items() if p.answered.is_set()]:
                    del held[token]
                yield pending.work_item
        finally:
            self.connected -= 1
            receive.close()
            abandoned = [p for p in held.values() if not p.answered.is_set()]
            for p in abandoned:
                p.abandon()
            log.info(
                "worker stream %d ended; %d work item(s) it held will be redelivered",
                number,
                len(abandoned),
            )
