-- dt-trio PostgreSQL schema, version 1: the tables of one task hub, in a schema of its own
-- (created by the sidecar as `dt_trio_<hub>`; every statement runs with it as search_path).
--
-- Leases: `lease_owner` names the hub process holding the row, `lease_epoch` counts the grants
-- (every write guarded by a lease checks both), `lease_until` is on the database's clock.
-- Ids compare byte by byte (COLLATE "C"), as everywhere else in dt-trio: pages and prefixes
-- do not depend on the database's locale.
-- Readiness lives on the leased row (`ready_at`: the earliest visible_at of its queue), kept
-- up to date under that row's lock, so a lease never re-checks another table.

CREATE TABLE schema_version (
    version     integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL
);

-- One row per orchestration instance: the current execution's summary and its lease.
CREATE TABLE instances (
    instance_id         text COLLATE "C" PRIMARY KEY,
    name                text NOT NULL,
    version             text,
    execution_id        text COLLATE "C" NOT NULL,
    status              smallint NOT NULL,
    input               text,
    output              text,
    custom_status       text,
    failure             bytea,
    created_at          timestamptz NOT NULL,
    last_updated_at     timestamptz NOT NULL,
    completed_at        timestamptz,
    scheduled_start_at  timestamptz,
    parent_instance_id  text COLLATE "C",
    tags                jsonb,
    trace_context       bytea,
    ready_at            timestamptz,  -- the earliest visible_at of its inbox; NULL: empty
    lease_owner         text COLLATE "C",
    lease_epoch         bigint NOT NULL DEFAULT 0,
    lease_until         timestamptz,
    -- failed attempts at the next step (a lease alone does not count): too many is poison
    attempts            integer NOT NULL DEFAULT 0
);
CREATE INDEX instances_ready ON instances (ready_at)
    WHERE lease_owner IS NULL AND ready_at IS NOT NULL;
CREATE INDEX instances_leased ON instances (lease_until) WHERE lease_owner IS NOT NULL;
CREATE INDEX instances_parent ON instances (parent_instance_id)
    WHERE parent_instance_id IS NOT NULL;
-- QueryInstances pages by (created_at, instance_id); ListInstanceIds by (completed_at, id).
CREATE INDEX instances_created ON instances (created_at, instance_id);
CREATE INDEX instances_status_created ON instances (status, created_at, instance_id);
CREATE INDEX instances_completed ON instances (completed_at, instance_id)
    WHERE completed_at IS NOT NULL;

-- The committed history of the current execution, in order. Its key is the backstop of the
-- leases: a step is written at the position its lease read, so two writers of one step
-- cannot both succeed.
CREATE TABLE history (
    instance_id  text COLLATE "C" NOT NULL,
    seq          integer NOT NULL,
    event        bytea NOT NULL,
    PRIMARY KEY (instance_id, seq)
);

-- Events waiting for an orchestration step (external events, results, timers, starts).
CREATE TABLE inbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id  text COLLATE "C" NOT NULL,
    event        bytea NOT NULL,
    visible_at   timestamptz NOT NULL
);
CREATE INDEX inbox_instance ON inbox (instance_id, visible_at);

-- Activities to run: the TaskScheduled event and the execution that scheduled it.
CREATE TABLE activities (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id   text COLLATE "C" NOT NULL,
    execution_id  text COLLATE "C" NOT NULL,
    event         bytea NOT NULL,
    visible_at    timestamptz NOT NULL,
    lease_owner   text COLLATE "C",
    lease_epoch   bigint NOT NULL DEFAULT 0,
    lease_until   timestamptz,
    attempts      integer NOT NULL DEFAULT 0
);
CREATE INDEX activities_ready ON activities (visible_at, id) WHERE lease_owner IS NULL;
CREATE INDEX activities_leased ON activities (lease_until) WHERE lease_owner IS NOT NULL;
CREATE INDEX activities_instance ON activities (instance_id);

-- Durable entities (@name@key): state, lock and lease. A row exists while the entity has
-- state, a lock or queued messages. `ready_at`: the earliest visible_at of its messages that
-- are not deferred.
CREATE TABLE entities (
    instance_id       text COLLATE "C" PRIMARY KEY,
    state             text,
    last_modified_at  timestamptz NOT NULL,
    locked_by         text COLLATE "C",  -- the critical section holding the lock
    lock_owner        text COLLATE "C",  -- the orchestration of that critical section
    ready_at          timestamptz,
    lease_owner       text COLLATE "C",
    lease_epoch       bigint NOT NULL DEFAULT 0,
    lease_until       timestamptz,
    attempts          integer NOT NULL DEFAULT 0
);
CREATE INDEX entities_ready ON entities (ready_at)
    WHERE lease_owner IS NULL AND ready_at IS NOT NULL;
CREATE INDEX entities_leased ON entities (lease_until) WHERE lease_owner IS NOT NULL;

-- Operations, lock requests and unlocks for an entity, in arrival order. `deferred` messages
-- wait for the entity's lock to change and are not a reason to lease the entity.
CREATE TABLE entity_inbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id  text COLLATE "C" NOT NULL,
    event        bytea NOT NULL,
    visible_at   timestamptz NOT NULL,
    deferred     boolean NOT NULL DEFAULT false
);
CREATE INDEX entity_inbox_instance ON entity_inbox (instance_id, id);
