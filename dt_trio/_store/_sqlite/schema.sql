-- dt-trio sqlite schema, version 2 (see _schema.py for the migration from 1). Times are integer
-- microseconds since the Unix epoch (UTC). A lease is (leased_by, lease_epoch): the owner, one
-- hub process, and the grant (see dt_trio._core._commit.Lease).
-- what marks a dt-trio store ("dttr"): another program's database is never taken for one
PRAGMA application_id = 1685353586;

-- One row per orchestration instance: the current execution's summary and its lease.
CREATE TABLE IF NOT EXISTS instances (
    instance_id         TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    version             TEXT,
    execution_id        TEXT NOT NULL,
    status              INTEGER NOT NULL,
    input               TEXT,
    output              TEXT,
    custom_status       TEXT,
    failure             BLOB,
    created_at          INTEGER NOT NULL,
    last_updated_at     INTEGER NOT NULL,
    completed_at        INTEGER,
    scheduled_start_at  INTEGER,
    parent_instance_id  TEXT,
    tags                TEXT,
    trace_context       BLOB,
    leased_by           TEXT,
    -- failed attempts at the next step (its worker crashed, gave it back or answered badly,
    -- or its commit failed; a lease alone does not count): too many and the step is poison
    failed_attempts     INTEGER NOT NULL DEFAULT 0,
    lease_epoch         INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS instances_parent ON instances (parent_instance_id)
    WHERE parent_instance_id IS NOT NULL;
-- QueryInstances pages by (created_at, instance_id); ListInstanceIds by (completed_at, id).
CREATE INDEX IF NOT EXISTS instances_created ON instances (created_at, instance_id);
CREATE INDEX IF NOT EXISTS instances_status_created ON instances (status, created_at, instance_id);
CREATE INDEX IF NOT EXISTS instances_completed ON instances (completed_at, instance_id)
    WHERE completed_at IS NOT NULL;

-- The committed history of the current execution, in order.
CREATE TABLE IF NOT EXISTS history (
    instance_id  TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    event        BLOB NOT NULL,
    PRIMARY KEY (instance_id, seq)
) WITHOUT ROWID;

-- Events waiting for an orchestration step (external events, results, timers, starts).
CREATE TABLE IF NOT EXISTS inbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id  TEXT NOT NULL,
    event        BLOB NOT NULL,
    visible_at   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS inbox_visible ON inbox (visible_at);
CREATE INDEX IF NOT EXISTS inbox_instance ON inbox (instance_id, visible_at);

-- Activities to run: the TaskScheduled event and the execution that scheduled it.
CREATE TABLE IF NOT EXISTS activities (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id   TEXT NOT NULL,
    execution_id  TEXT NOT NULL,
    event         BLOB NOT NULL,
    visible_at    INTEGER NOT NULL,
    leased_by     TEXT,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    lease_epoch   INTEGER
);
CREATE INDEX IF NOT EXISTS activities_ready ON activities (leased_by, visible_at);
CREATE INDEX IF NOT EXISTS activities_instance ON activities (instance_id);

-- Durable entities (@name@key): state, lock (an orchestration's critical section) and lease. A row exists while the entity has state,
-- a lock or queued messages.
CREATE TABLE IF NOT EXISTS entities (
    instance_id       TEXT PRIMARY KEY,
    state             TEXT,
    last_modified_at  INTEGER NOT NULL,
    locked_by         TEXT,   -- the critical section holding the lock
    lock_owner        TEXT,   -- the orchestration of that critical section
    leased_by         TEXT,
    failed_attempts   INTEGER NOT NULL DEFAULT 0,
    lease_epoch       INTEGER
) WITHOUT ROWID;

-- Operations, lock requests and unlocks for an entity, in arrival order. `deferred` messages
-- wait for the entity's lock to change and are not a reason to lease the entity.
CREATE TABLE IF NOT EXISTS entity_inbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id  TEXT NOT NULL,
    event        BLOB NOT NULL,
    visible_at   INTEGER NOT NULL,
    deferred     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entity_inbox_ready ON entity_inbox (deferred, visible_at);
CREATE INDEX IF NOT EXISTS entity_inbox_instance ON entity_inbox (instance_id, visible_at);

PRAGMA user_version = 2;
