-- clawfleet schema, PostgreSQL.

CREATE SEQUENCE clawfleet_revision_seq AS bigint;

CREATE TABLE desired_containers (
    user_id           text        NOT NULL PRIMARY KEY,
    state             text        NOT NULL DEFAULT 'running',
    idle_timeout_secs bigint      NULL,
    last_active_at    timestamptz NULL,
    image             text        NULL,
    restart_nonce     bigint      NOT NULL DEFAULT 0,
    revision          bigint      NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX desired_containers_revision_idx ON desired_containers (revision);

-- One tombstone per deleted user id, so a poller sees deletions later.
CREATE TABLE desired_deletions (
    user_id    text        NOT NULL PRIMARY KEY,
    revision   bigint      NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX desired_deletions_revision_idx ON desired_deletions (revision);

-- A notification payload must stay under 8000 bytes; a longer (invalid) id
-- is announced with an empty payload, which makes the listener poll.
CREATE FUNCTION clawfleet_notify_payload(id text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN octet_length(id) <= 1024 THEN id ELSE '' END
$$;

-- A tombstone for a user id that no longer has a desired row.
CREATE FUNCTION clawfleet_record_deletion(id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO desired_deletions (user_id, revision)
    VALUES (id, nextval('clawfleet_revision_seq'))
    ON CONFLICT (user_id) DO UPDATE
        SET revision = EXCLUDED.revision, deleted_at = now();
    PERFORM pg_notify('clawfleet_desired', clawfleet_notify_payload(id));
END
$$;

CREATE FUNCTION clawfleet_desired_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.revision := nextval('clawfleet_revision_seq');
    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := clock_timestamp();
        IF NEW.user_id IS DISTINCT FROM OLD.user_id THEN
            PERFORM clawfleet_record_deletion(OLD.user_id);
        END IF;
    ELSE
        DELETE FROM desired_deletions WHERE user_id = NEW.user_id;
    END IF;
    PERFORM pg_notify('clawfleet_desired', clawfleet_notify_payload(NEW.user_id));
    RETURN NEW;
END
$$;

CREATE TRIGGER desired_containers_changed
BEFORE INSERT OR UPDATE ON desired_containers
FOR EACH ROW EXECUTE FUNCTION clawfleet_desired_changed();

CREATE FUNCTION clawfleet_desired_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM clawfleet_record_deletion(OLD.user_id);
    RETURN OLD;
END
$$;

CREATE TRIGGER desired_containers_deleted
AFTER DELETE ON desired_containers
FOR EACH ROW EXECUTE FUNCTION clawfleet_desired_deleted();

CREATE TABLE container_status (
    user_id            text        NOT NULL PRIMARY KEY,
    phase              text        NOT NULL,
    container_id       text        NULL,
    container_name     text        NULL,
    host_port          integer     NULL UNIQUE,
    url                text        NULL,
    host_url           text        NULL,
    health             text        NULL,
    gateway_token      text        NULL,
    observed_revision  bigint      NULL,
    message            text        NULL,
    restarts           bigint      NOT NULL DEFAULT 0,
    last_transition_at timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX container_status_phase_idx ON container_status (phase);
