"""Wake-ups between sidecars: what a NOTIFY carries, and how they are coalesced.

Each commit's wake-ups (`dt_trio._core._commit.Wakeups`) are added to an `Outbox`; the store's
notifier sends what gathered as one NOTIFY on the hub's channel at most every NOTIFY_INTERVAL,
outside any write transaction (a NOTIFY inside each commit would serialise the commits: PostgreSQL
takes a global lock to queue it). A payload names its sender (which ignores its own), the
kinds of work added and the instances changed; when the ids do not fit, it says "any instance"
and the receivers' waiters read the store again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import trio

from dt_trio._core._commit import Wakeups, WorkKind

# At most one NOTIFY per sidecar this often: commits coalesce behind it.
NOTIFY_INTERVAL = 0.002
# PostgreSQL's limit on a payload is 8000 bytes; ids beyond this budget become "any".
PAYLOAD_BUDGET = 7000

_LETTER = {WorkKind.ORCHESTRATION: "o", WorkKind.ACTIVITY: "a", WorkKind.ENTITY: "e"}
_KIND = {letter: kind for kind, letter in _LETTER.items()}


@dataclass(frozen=True)
class Notice:
    """What one NOTIFY says: who sent it, the kinds of work added, the instances changed
    (None: any instance may have changed)."""

    sender: str
    kinds: frozenset[WorkKind]
    instances: tuple[str, ...] | None

    def encode(self) -> str:
        return json.dumps(
            {
                "s": self.sender,
                "k": "".join(sorted(_LETTER[k] for k in self.kinds)),
                "i": None if self.instances is None else list(self.instances),
            },
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, payload: str) -> Notice | None:
        """The notice, or None for a payload that is not one of ours."""
        try:
            fields = json.loads(payload)
            instances = fields["i"]
            return cls(
                sender=str(fields["s"]),
                kinds=frozenset(_KIND[letter] for letter in fields["k"]),
                instances=None if instances is None else tuple(str(i) for i in instances),
            )
        except (ValueError, KeyError, TypeError):
            return None


def kinds_of(wakeups: Wakeups) -> frozenset[WorkKind]:
    """The kinds of work `wakeups` says were added."""
    added = (
        (WorkKind.ORCHESTRATION, wakeups.orchestrations),
        (WorkKind.ACTIVITY, wakeups.activities),
        (WorkKind.ENTITY, wakeups.entities),
    )
    return frozenset(kind for kind, woken in added if woken)


def wakeups_of(kinds: frozenset[WorkKind], instances: tuple[str, ...] = ()) -> Wakeups:
    """The wake-ups of `kinds` of work added and `instances` changed (state unknown)."""
    return Wakeups(
        orchestrations=WorkKind.ORCHESTRATION in kinds,
        activities=WorkKind.ACTIVITY in kinds,
        entities=WorkKind.ENTITY in kinds,
        instances=tuple((i, None) for i in instances),
    )


class Outbox:
    """Wake-ups waiting to be sent to the other sidecars, merged."""

    def __init__(self, sender: str) -> None:
        self.sender = sender
        self._kinds: set[WorkKind] = set()
        self._instances: dict[str, None] = {}  # ordered: a payload takes the oldest first
        self._any_instance = False
        self._size = 0
        self._pending = trio.Event()

    def add(self, wakeups: Wakeups) -> None:
        kinds = kinds_of(wakeups)
        self._kinds |= kinds
        if not self._any_instance:
            for instance_id, _ in wakeups.instances:
                if instance_id not in self._instances:
                    self._instances[instance_id] = None
                    self._size += len(json.dumps(instance_id)) + 1
            if self._size > PAYLOAD_BUDGET:
                self._any_instance = True
                self._instances.clear()
        if kinds or wakeups.instances:
            self._pending.set()

    def add_everything(self) -> None:
        """Every kind of work, any instance (a sidecar giving its leases back, say)."""
        self._kinds |= set(WorkKind)
        self._any_instance = True
        self._instances.clear()
        self._pending.set()

    def greet(self) -> None:
        """Nothing but the sender: a sidecar that starts listening tells the others it is
        there (see the store's `_peers`)."""
        self._pending.set()

    def __bool__(self) -> bool:
        return self._pending.is_set()

    async def wait(self) -> None:
        await self._pending.wait()

    def take(self) -> str | None:
        """The payload of everything added since the last take (None: nothing)."""
        if not self._pending.is_set():
            return None
        notice = Notice(
            self.sender,
            frozenset(self._kinds),
            None if self._any_instance else tuple(self._instances),
        )
        self._kinds.clear()
        self._instances.clear()
        self._any_instance = False
        self._size = 0
        self._pending = trio.Event()
        return notice.encode()
