"""Which wake-ups a commit causes: one function for every store.

A commit that adds visible work wakes the processors of its kind; a commit that changes an
instance wakes whoever waits for it (WaitForInstance*, the local client). Both stores tell
their own listener the same thing for the same commit; PostgreSQL also passes it to the other
sidecars on the database (see `_postgres._notify`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dt_trio._core import InstanceState, is_entity_id
from dt_trio._core._commit import (
    Applied,
    Commit,
    CreateInstance,
    Release,
    Reopen,
    Send,
    WorkKind,
    WriteEntityStep,
    WriteStep,
)
from dt_trio._store._backend import StoreListener


@dataclass(frozen=True)
class Wakeups:
    """What a commit changed that someone may wait for: kinds of work added, and instances
    changed (with their new state when the commit wrote it whole)."""

    kinds: frozenset[WorkKind] = frozenset()
    instances: tuple[tuple[str, InstanceState | None], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.kinds or self.instances)


def wakeups(commit: Commit, applied: Applied) -> Wakeups:
    """The wake-ups of `commit` as it was applied (its `otherwise`, if that was applied)."""
    while applied.alternative and commit.otherwise is not None:
        commit = commit.otherwise
        applied = Applied(
            alternative=False,
            orchestrations=applied.orchestrations,
            activities=applied.activities,
            waiting=applied.waiting,
            dropped=applied.dropped,
        )
    taken = {item.state.instance_id for item in applied.orchestrations}
    kinds: set[WorkKind] = set()
    changed: dict[str, InstanceState | None] = {}

    def sent(targets: list[str]) -> None:
        for target in targets:
            if is_entity_id(target):
                kinds.add(WorkKind.ENTITY)
            elif target not in taken:  # a hand-over: its processor has it already
                kinds.add(WorkKind.ORCHESTRATION)

    for write in commit.writes:
        if isinstance(write, CreateInstance):
            if write.started is not None and write.state.instance_id not in taken:
                kinds.add(WorkKind.ORCHESTRATION)
            changed[write.state.instance_id] = write.state
        elif isinstance(write, Send):
            sent([m.target_instance_id for m in write.messages])
        elif isinstance(write, WriteStep):
            result = write.result
            if applied.waiting or result.new_instances:
                kinds.add(WorkKind.ORCHESTRATION)
            sent([m.target_instance_id for m in result.messages])
            if len(result.activities) > len(applied.activities):
                kinds.add(WorkKind.ACTIVITY)
            changed[result.state.instance_id] = result.state
            for new in result.new_instances:
                changed.setdefault(new.state.instance_id, None)
        elif isinstance(write, WriteEntityStep):
            result_e = write.result
            kinds.add(WorkKind.ENTITY)  # messages that arrived during the step
            sent([m.target_instance_id for m in result_e.messages])
            if result_e.new_instances:
                kinds.add(WorkKind.ORCHESTRATION)
            for new in result_e.new_instances:
                changed.setdefault(new.state.instance_id, None)
        elif isinstance(write, Reopen):
            changed[write.instance_id] = None
        elif isinstance(write, Release):
            kinds.add(write.kind)
    return Wakeups(frozenset(kinds), tuple(changed.items()))


def tell(listener: StoreListener, wakeups: Wakeups) -> None:
    """Pass `wakeups` to a store's listener."""
    if WorkKind.ORCHESTRATION in wakeups.kinds:
        listener.orchestration_work_added()
    if WorkKind.ACTIVITY in wakeups.kinds:
        listener.activity_work_added()
    if WorkKind.ENTITY in wakeups.kinds:
        listener.entity_work_added()
    for instance_id, state in wakeups.instances:
        listener.instance_changed(instance_id, state)
