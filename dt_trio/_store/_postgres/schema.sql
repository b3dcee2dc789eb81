-- dt-trio PostgreSQL schema, version 1: the tables of one task hub, in a schema of its own
-- (created by the sidecar as `dt_trio_<hub>`; every statement runs with it as search_path).
--
-- Leases: `lease_owner` names the hub process holding the row, `lease_epoch` the grant (drawn
-- from one sequence, so no two grants of a row share one, even after the row is deleted and
-- made again; every write guarded by a lease checks both), `lease_until` is on the database's
-- clock.
-- Ids compare byte by byte (COLLATE "C"), as everywhere else in dt-trio: pages and prefixes
-- do not depend on the database's locale.
-- Readiness lives on the leased row (`ready_at`: the earliest visible_at of its queue), kept
-- up to date under that row's lock, so a lease never re-checks another table.

CREATE SEQUENCE lease_epochs;

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

-- The commits the engine makes most, as functions: each is one statement, one round trip,
-- instead of a transaction of several (see _apply.py, which calls them and has the general
-- path they must agree with). Inside a function every statement sees what committed before
-- it began, so what follows a lock sees every message sent before the lock was taken.

-- The statuses of a finished instance: COMPLETED, FAILED, CANCELED, TERMINATED.
CREATE FUNCTION finished_statuses() RETURNS smallint[]
    LANGUAGE sql IMMUTABLE AS $$ SELECT '{1,3,4,5}'::smallint[] $$;

-- Messages to orchestrations, in order: each made visible on its instance's row (readiness);
-- dropped when the instance, or the execution it names (when it names one), is gone.
-- Returns how many were delivered.
CREATE FUNCTION send_to_instances(
    p_ids text[], p_events bytea[], p_visible timestamptz[], p_executions text[]
) RETURNS bigint LANGUAGE sql AS $$
    WITH m AS (
        SELECT * FROM unnest(p_ids, p_events, p_visible, p_executions)
            WITH ORDINALITY AS m(target, event, visible_at, execution, ord)
    ), t AS (
        UPDATE instances i SET ready_at = LEAST(i.ready_at, (
            SELECT min(m.visible_at) FROM m WHERE m.target = i.instance_id
            AND (m.execution IS NULL OR m.execution = i.execution_id)))
        WHERE i.instance_id IN (SELECT target FROM m)
        RETURNING i.instance_id AS target, i.execution_id AS execution
    ), sent AS (
        INSERT INTO inbox (instance_id, event, visible_at)
        SELECT m.target, m.event, m.visible_at FROM m JOIN t USING (target)
        WHERE m.execution IS NULL OR m.execution = t.execution
        ORDER BY m.ord
        RETURNING 1
    )
    SELECT count(*) FROM sent
$$;

-- Messages to entities, in order; an entity comes into being with its first message.
CREATE FUNCTION send_to_entities(
    p_ids text[], p_events bytea[], p_visible timestamptz[]
) RETURNS void LANGUAGE sql AS $$
    WITH m AS (
        SELECT * FROM unnest(p_ids, p_events, p_visible)
            WITH ORDINALITY AS m(target, event, visible_at, ord)
    ), e AS (
        INSERT INTO entities AS e (instance_id, last_modified_at, ready_at)
        SELECT target, min(visible_at), min(visible_at) FROM m GROUP BY target
        ON CONFLICT (instance_id) DO UPDATE SET ready_at = LEAST(e.ready_at, EXCLUDED.ready_at)
        RETURNING 1
    )
    INSERT INTO entity_inbox (instance_id, event, visible_at)
    SELECT target, event, visible_at FROM m ORDER BY ord
$$;

-- One orchestration step that neither continues as new nor starts instances: after its
-- instance's lease is checked (when p_owner is given; else the caller's guards did), its
-- history, consumed messages, activities (the first p_count leased to p_take_owner), messages
-- (to other instances, to itself, to entities) and its row; if it ends the execution, the
-- activities the execution still waited for are dropped. Readiness: the earliest of the
-- messages it leaves and of those it sends itself. Each part is a statement run only when
-- the step has something for it: as parts of one statement, every part's tables and indexes
-- were opened and locked on every call, and the function cost a third more.
CREATE FUNCTION write_step(
    p_owner text, p_epoch bigint,
    p_id text, p_start integer, p_history bytea[], p_consumed bigint[],
    p_name text, p_version text, p_execution text, p_status smallint, p_input text,
    p_output text, p_custom_status text, p_failure bytea, p_created_at timestamptz,
    p_last_updated_at timestamptz, p_completed_at timestamptz, p_scheduled_start_at timestamptz,
    p_parent text, p_tags jsonb, p_trace bytea,
    p_now timestamptz, p_count integer, p_take_owner text, p_ttl interval, p_activities bytea[],
    p_m_ids text[], p_m_events bytea[], p_m_visible timestamptz[], p_m_executions text[],
    p_o_events bytea[], p_o_visible timestamptz[],
    p_e_ids text[], p_e_events bytea[], p_e_visible timestamptz[],
    OUT o_held boolean, OUT o_waiting boolean, OUT o_delivered bigint, OUT o_leased bigint[],
    OUT o_epochs bigint[]
) LANGUAGE plpgsql AS $$
BEGIN
    IF p_owner IS NOT NULL THEN
        PERFORM 1 FROM instances
        WHERE instance_id = p_id AND lease_owner = p_owner AND lease_epoch = p_epoch
        FOR UPDATE;
        IF NOT FOUND THEN
            o_held := false;
            RETURN;
        END IF;
    END IF;
    o_held := true;
    IF cardinality(p_history) > 0 THEN
        INSERT INTO history (instance_id, seq, event)
        SELECT p_id, coalesce(p_start,
            (SELECT coalesce(max(seq) + 1, 0) FROM history WHERE instance_id = p_id))
            + h.ord - 1, h.event
        FROM unnest(p_history) WITH ORDINALITY AS h(event, ord);
    END IF;
    IF cardinality(p_consumed) > 0 THEN
        DELETE FROM inbox WHERE instance_id = p_id AND id = ANY(p_consumed);
    END IF;
    IF p_status = ANY(finished_statuses()) THEN
        -- the step that ends the execution drops the activities it waited for (before its
        -- own are written, and while the row still has the status it had)
        DELETE FROM activities
        WHERE instance_id = p_id
        AND EXISTS (SELECT 1 FROM instances
                    WHERE instance_id = p_id AND NOT status = ANY(finished_statuses()));
    END IF;
    IF cardinality(p_activities) > 0 THEN
        WITH a AS (
            INSERT INTO activities
                (instance_id, execution_id, event, visible_at, lease_owner, lease_epoch,
                 lease_until)
            SELECT p_id, p_execution, a.event, p_now,
                CASE WHEN a.ord <= p_count THEN p_take_owner END,
                CASE WHEN a.ord <= p_count THEN nextval('lease_epochs') ELSE 0 END,
                CASE WHEN a.ord <= p_count THEN now() + p_ttl END
            FROM unnest(p_activities) WITH ORDINALITY AS a(event, ord)
            ORDER BY a.ord
            RETURNING id, lease_epoch, lease_owner IS NOT NULL AS handed
        )
        SELECT ARRAY(SELECT id FROM a WHERE handed ORDER BY id),
            ARRAY(SELECT lease_epoch FROM a WHERE handed ORDER BY id)
        INTO o_leased, o_epochs;
    ELSE
        o_leased := '{}';
        o_epochs := '{}';
    END IF;
    o_delivered := 0;
    IF cardinality(p_m_ids) > 0 THEN
        o_delivered := send_to_instances(p_m_ids, p_m_events, p_m_visible, p_m_executions);
    END IF;
    IF cardinality(p_o_events) > 0 THEN
        INSERT INTO inbox (instance_id, event, visible_at)
        SELECT p_id, o.event, o.visible_at
        FROM unnest(p_o_events, p_o_visible) WITH ORDINALITY AS o(event, visible_at, ord)
        ORDER BY o.ord;
    END IF;
    IF cardinality(p_e_ids) > 0 THEN
        PERFORM send_to_entities(p_e_ids, p_e_events, p_e_visible);
    END IF;
    UPDATE instances SET name = p_name, version = p_version, execution_id = p_execution,
        status = p_status, input = p_input, output = p_output,
        custom_status = p_custom_status, failure = p_failure, created_at = p_created_at,
        last_updated_at = p_last_updated_at, completed_at = p_completed_at,
        scheduled_start_at = p_scheduled_start_at, parent_instance_id = p_parent,
        tags = p_tags, trace_context = p_trace,
        lease_owner = NULL, lease_until = NULL, attempts = 0,
        ready_at = (SELECT min(visible_at) FROM inbox WHERE instance_id = p_id)
    WHERE instance_id = p_id
    RETURNING ready_at IS NOT NULL INTO o_waiting;
END
$$;

-- An activity's result: the activity deleted if it is still leased with (p_owner, p_epoch)
-- (else nothing changes: o_held is false), its result delivered to the execution that
-- scheduled it (unless that is gone: o_delivered), and, with p_take_owner, the instance
-- leased if nobody holds it and it has a visible message: its row, history and inbox.
CREATE FUNCTION deliver(
    p_activity bigint, p_owner text, p_epoch bigint,
    p_id text, p_execution text, p_event bytea, p_visible timestamptz,
    p_take_owner text, p_ttl interval, p_now timestamptz,
    OUT o_held boolean, OUT o_delivered boolean,
    OUT instance_id text, OUT name text, OUT version text, OUT execution_id text,
    OUT status smallint, OUT input text, OUT output text, OUT custom_status text,
    OUT failure bytea, OUT created_at timestamptz, OUT last_updated_at timestamptz,
    OUT completed_at timestamptz, OUT scheduled_start_at timestamptz,
    OUT parent_instance_id text, OUT tags jsonb, OUT trace_context bytea,
    OUT lease_epoch bigint, OUT attempts integer,
    OUT history bytea[], OUT inbox_ids bigint[], OUT inbox_events bytea[]
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    taken boolean;
BEGIN
    DELETE FROM activities a
    WHERE a.id = p_activity AND a.lease_owner = p_owner AND a.lease_epoch = p_epoch;
    o_held := FOUND;
    IF NOT o_held THEN
        RETURN;
    END IF;
    -- the row locked first: its readiness and its lease change in one update
    SELECT p_take_owner IS NOT NULL AND i.lease_owner IS NULL
        AND LEAST(i.ready_at, p_visible) <= p_now
    INTO taken
    FROM instances i WHERE i.instance_id = p_id AND i.execution_id = p_execution
    FOR UPDATE;
    o_delivered := FOUND;
    IF NOT o_delivered THEN
        RETURN;
    END IF;
    INSERT INTO inbox (instance_id, event, visible_at) VALUES (p_id, p_event, p_visible);
    IF NOT taken THEN
        UPDATE instances i SET ready_at = LEAST(i.ready_at, p_visible)
        WHERE i.instance_id = p_id;
        RETURN;
    END IF;
    UPDATE instances i SET ready_at = LEAST(i.ready_at, p_visible), lease_owner = p_take_owner,
        lease_epoch = nextval('lease_epochs'), lease_until = now() + p_ttl
    WHERE i.instance_id = p_id
    RETURNING i.instance_id, i.name, i.version, i.execution_id, i.status, i.input, i.output,
        i.custom_status, i.failure, i.created_at, i.last_updated_at, i.completed_at,
        i.scheduled_start_at, i.parent_instance_id, i.tags, i.trace_context, i.lease_epoch,
        i.attempts
    INTO instance_id, name, version, execution_id, status, input, output, custom_status,
        failure, created_at, last_updated_at, completed_at, scheduled_start_at,
        parent_instance_id, tags, trace_context, lease_epoch, attempts;
    IF FOUND THEN
        SELECT ARRAY(SELECT h.event FROM history h WHERE h.instance_id = p_id ORDER BY h.seq),
            ARRAY(SELECT m.id FROM inbox m WHERE m.instance_id = p_id AND m.visible_at <= p_now
                ORDER BY m.id),
            ARRAY(SELECT m.event FROM inbox m WHERE m.instance_id = p_id
                AND m.visible_at <= p_now ORDER BY m.id)
        INTO history, inbox_ids, inbox_events;
    END IF;
END
$$;

-- An instance created with its ExecutionStarted message, unless one with its id exists whose
-- status is not in p_replaceable (o_status says which, and nothing changes); one that may be
-- replaced is deleted first. With p_take_owner, an instance that can start now is leased to
-- it: o_epoch, and its message o_message (its work item is what was given: no history).
CREATE FUNCTION start(
    p_replaceable smallint[],
    p_id text, p_name text, p_version text, p_execution text, p_status smallint, p_input text,
    p_output text, p_custom_status text, p_failure bytea, p_created_at timestamptz,
    p_last_updated_at timestamptz, p_completed_at timestamptz, p_scheduled_start_at timestamptz,
    p_parent text, p_tags jsonb, p_trace bytea,
    p_started bytea, p_visible timestamptz, p_take_owner text, p_ttl interval, p_now timestamptz,
    OUT o_status smallint, OUT o_message bigint, OUT o_epoch bigint
) LANGUAGE plpgsql AS $$
DECLARE
    found_status smallint;
    taken boolean := p_take_owner IS NOT NULL AND p_visible <= p_now;
BEGIN
    SELECT status INTO found_status FROM instances WHERE instance_id = p_id FOR UPDATE;
    IF FOUND THEN
        IF NOT found_status = ANY(p_replaceable) THEN
            o_status := found_status;
            RETURN;
        END IF;
        DELETE FROM history WHERE instance_id = p_id;
        DELETE FROM inbox WHERE instance_id = p_id;
        DELETE FROM activities WHERE instance_id = p_id;
        DELETE FROM instances WHERE instance_id = p_id;
    END IF;
    INSERT INTO instances (instance_id, name, version, execution_id, status, input, output,
        custom_status, failure, created_at, last_updated_at, completed_at, scheduled_start_at,
        parent_instance_id, tags, trace_context, ready_at, lease_owner, lease_epoch, lease_until)
    VALUES (p_id, p_name, p_version, p_execution, p_status, p_input, p_output, p_custom_status,
        p_failure, p_created_at, p_last_updated_at, p_completed_at, p_scheduled_start_at,
        p_parent, p_tags, p_trace, p_visible,
        CASE WHEN taken THEN p_take_owner END,
        CASE WHEN taken THEN nextval('lease_epochs') ELSE 0 END,
        CASE WHEN taken THEN now() + p_ttl END)
    RETURNING CASE WHEN taken THEN lease_epoch END INTO o_epoch;
    INSERT INTO inbox (instance_id, event, visible_at) VALUES (p_id, p_started, p_visible)
    RETURNING id INTO o_message;
END
$$;
