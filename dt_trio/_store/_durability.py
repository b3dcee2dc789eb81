"""How far a commit survives: the one setting every store maps to its own knobs."""

from __future__ import annotations

import enum


class Durability(enum.StrEnum):
    """What a committed step, start or event survives.

    NORMAL: the sidecar's process dying (a crash, kill -9); an OS crash or a power cut may roll
    back the last commits. sqlite: ``synchronous=NORMAL`` in WAL mode (the WAL is synced at
    checkpoints, not at every commit).

    FULL: also an OS crash or a power cut: a commit is on disk before anyone hears of it.
    sqlite: ``synchronous=FULL`` (the WAL is synced at every commit; a group commit pays one
    sync for all the writes in it). PostgreSQL: ``synchronous_commit=on``, the server's
    default; a PostgreSQL store may keep it for NORMAL too (more durable than asked is
    allowed, less never).
    """

    NORMAL = "normal"
    FULL = "full"
