-- clawfleet schema, SQLite.
-- Timestamps are TEXT in RFC 3339 UTC; the form datetime('now') writes
-- ('YYYY-MM-DD HH:MM:SS') is accepted on read as well.

CREATE TABLE desired_containers (
    user_id           TEXT    NOT NULL PRIMARY KEY,
    state             TEXT    NOT NULL DEFAULT 'running',
    idle_timeout_secs INTEGER NULL,
    last_active_at    TEXT    NULL,
    image             TEXT    NULL,
    restart_nonce     INTEGER NOT NULL DEFAULT 0,
    revision          INTEGER NOT NULL DEFAULT 0,
    created_at        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX desired_containers_revision_idx ON desired_containers (revision);

-- The single revision counter shared by inserts, updates and deletions.
CREATE TABLE clawfleet_revision (
    id    INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO clawfleet_revision (id, value) VALUES (1, 0);

-- One tombstone per deleted user id, so a poller sees deletions later.
CREATE TABLE desired_deletions (
    user_id    TEXT    NOT NULL PRIMARY KEY,
    revision   INTEGER NOT NULL,
    deleted_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX desired_deletions_revision_idx ON desired_deletions (revision);

CREATE TRIGGER desired_containers_revision_on_insert
AFTER INSERT ON desired_containers
BEGIN
    UPDATE clawfleet_revision SET value = value + 1 WHERE id = 1;
    UPDATE desired_containers
       SET revision = (SELECT value FROM clawfleet_revision WHERE id = 1)
     WHERE user_id = NEW.user_id;
    DELETE FROM desired_deletions WHERE user_id = NEW.user_id;
END;

-- Fires for writer updates only: the trigger's own update changes revision,
-- so it never re-fires itself, even with PRAGMA recursive_triggers on.
CREATE TRIGGER desired_containers_revision_on_update
AFTER UPDATE ON desired_containers
WHEN NEW.revision IS OLD.revision
BEGIN
    UPDATE clawfleet_revision SET value = value + 1 WHERE id = 1;
    UPDATE desired_containers
       SET revision = (SELECT value FROM clawfleet_revision WHERE id = 1),
           updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
     WHERE user_id = NEW.user_id;
END;

-- A writer may not set revision itself: only the value the counter just
-- handed out is accepted.
CREATE TRIGGER desired_containers_revision_guard
BEFORE UPDATE OF revision ON desired_containers
WHEN NEW.revision IS NOT OLD.revision
 AND NEW.revision IS NOT (SELECT value FROM clawfleet_revision WHERE id = 1)
BEGIN
    SELECT RAISE(ABORT, 'desired_containers.revision is assigned by the database');
END;

-- Renaming a user id is a deletion of the old id.
CREATE TRIGGER desired_containers_rename
AFTER UPDATE OF user_id ON desired_containers
WHEN NEW.user_id IS NOT OLD.user_id
BEGIN
    UPDATE clawfleet_revision SET value = value + 1 WHERE id = 1;
    INSERT OR REPLACE INTO desired_deletions (user_id, revision)
    VALUES (OLD.user_id, (SELECT value FROM clawfleet_revision WHERE id = 1));
END;

CREATE TRIGGER desired_containers_on_delete
AFTER DELETE ON desired_containers
BEGIN
    UPDATE clawfleet_revision SET value = value + 1 WHERE id = 1;
    INSERT OR REPLACE INTO desired_deletions (user_id, revision)
    VALUES (OLD.user_id, (SELECT value FROM clawfleet_revision WHERE id = 1));
END;

CREATE TABLE container_status (
    user_id            TEXT    NOT NULL PRIMARY KEY,
    phase              TEXT    NOT NULL,
    container_id       TEXT    NULL,
    container_name     TEXT    NULL,
    host_port          INTEGER NULL UNIQUE,
    url                TEXT    NULL,
    host_url           TEXT    NULL,
    health             TEXT    NULL,
    gateway_token      TEXT    NULL,
    observed_revision  INTEGER NULL,
    message            TEXT    NULL,
    restarts           INTEGER NOT NULL DEFAULT 0,
    last_transition_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at         TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX container_status_phase_idx ON container_status (phase);
