"""The database schema, as numbered migrations applied in order by `Connection._migrate`."""

# Each entry upgrades the schema by one version; never edit a released entry, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        received_at REAL NOT NULL,
        source TEXT NOT NULL,
        peer TEXT NOT NULL DEFAULT '',
        mail_from TEXT,
        rcpt_tos TEXT NOT NULL DEFAULT '[]',
        message_id TEXT NOT NULL DEFAULT '',
        fingerprint TEXT NOT NULL,
        size INTEGER NOT NULL,
        raw BLOB,
        duplicate_of INTEGER REFERENCES messages(id)
    );
    CREATE INDEX messages_fingerprint ON messages(fingerprint);
    CREATE INDEX messages_received ON messages(received_at);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        message INTEGER NOT NULL REFERENCES messages(id),
        service TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        outcome TEXT,
        rule TEXT,
        action TEXT,
        incident_key TEXT,
        summary TEXT,
        severity TEXT,
        reason TEXT,
        details TEXT,
        trace TEXT,
        decided_at REAL,
        UNIQUE (service, fingerprint)
    );
    CREATE INDEX jobs_pending ON jobs(state, id);
    CREATE TABLE incidents (
        service TEXT NOT NULL,
        incident_key TEXT NOT NULL,
        state TEXT NOT NULL,
        summary TEXT NOT NULL DEFAULT '',
        trigger_count INTEGER NOT NULL DEFAULT 0,
        acknowledge_count INTEGER NOT NULL DEFAULT 0,
        resolve_count INTEGER NOT NULL DEFAULT 0,
        times_opened INTEGER NOT NULL DEFAULT 0,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        opened_at REAL,
        resolved_at REAL,
        last_message INTEGER,
        case_message_id TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (service, incident_key)
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        service TEXT NOT NULL,
        order_key TEXT NOT NULL,
        payload TEXT NOT NULL,
        job INTEGER,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        response TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX outbox_pending ON outbox(state, order_key, id);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        service TEXT NOT NULL DEFAULT '',
        message INTEGER,
        incident_key TEXT,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_at ON events(at);
    CREATE TABLE imap_state (
        account TEXT NOT NULL,
        folder TEXT NOT NULL,
        uidvalidity INTEGER NOT NULL,
        last_uid INTEGER NOT NULL,
        last_success REAL,
        PRIMARY KEY (account, folder)
    );
    """,
    # 2: operations. `heartbeat` is what /healthz writes to prove the store takes commits;
    # `metric_offsets` keeps counters monotonic when retention deletes the rows they count.
    """
    CREATE TABLE heartbeat (name TEXT PRIMARY KEY, at REAL NOT NULL);
    CREATE TABLE metric_offsets (
        metric TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '[]',
        value REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (metric, labels)
    );
    """,
    # 3: duplicates are found through jobs' UNIQUE (service, fingerprint); this index only cost
    # one more random page write in every acceptance commit.
    """
    DROP INDEX IF EXISTS messages_fingerprint;
    """,
    # 4: the outbox tells the truth. `lease_owner` names the worker ("host:pid") whose claim
    # `next_attempt_at` holds while it is pending: a restarted worker releases a dead one's
    # claims at once, and a re-queue can see an item in flight. `requeued_at` restarts the
    # give-up clock of a re-queued dead letter while `created_at` keeps the original time.
    """
    ALTER TABLE outbox ADD COLUMN lease_owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE outbox ADD COLUMN requeued_at REAL;
    """,
    # 5: IMAP messages that could not be read yet (owed, retried with backoff, reported), and
    # the accepted UIDs whose after-action is still due (the position commits with the batch).
    """
    ALTER TABLE imap_state ADD COLUMN unfinished TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE imap_failures (
        account TEXT NOT NULL,
        folder TEXT NOT NULL,
        uid INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        first_failed_at REAL NOT NULL,
        last_failed_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL,
        error TEXT NOT NULL DEFAULT '',
        reported_at REAL,
        PRIMARY KEY (account, folder, uid)
    );
    """,
    # 6: what the status page shows. Every delivery attempt and its answer (and every re-queue)
    # is kept by triggers, so whichever code records results, the incident timeline sees each
    # one; attempts go with their item when retention deletes it. jobs(message) and
    # outbox(job) grow in insertion order (cheap appends) and serve the per-minute chart, the
    # message page and retention's lookups.
    """
    CREATE TABLE outbox_attempts (
        id INTEGER PRIMARY KEY,
        item INTEGER NOT NULL,
        at REAL NOT NULL,
        attempt INTEGER NOT NULL,
        state TEXT NOT NULL,
        error TEXT NOT NULL DEFAULT '',
        response TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX outbox_attempts_item ON outbox_attempts(item, id);
    CREATE TRIGGER outbox_attempt_recorded AFTER UPDATE OF attempts ON outbox
    WHEN NEW.attempts > OLD.attempts BEGIN
        INSERT INTO outbox_attempts (item, at, attempt, state, error, response)
        VALUES (NEW.id, NEW.updated_at, NEW.attempts, NEW.state, NEW.last_error,
                substr(NEW.response, 1, 2000));
    END;
    CREATE TRIGGER outbox_requeued AFTER UPDATE OF state ON outbox
    WHEN OLD.state = 'dead' AND NEW.state = 'pending' BEGIN
        INSERT INTO outbox_attempts (item, at, attempt, state)
        VALUES (NEW.id, NEW.updated_at, NEW.attempts, 'requeued');
    END;
    CREATE TRIGGER outbox_attempts_purged AFTER DELETE ON outbox BEGIN
        DELETE FROM outbox_attempts WHERE item = OLD.id;
    END;
    CREATE INDEX jobs_message ON jobs(message);
    CREATE INDEX outbox_job ON outbox(job);
    """,
    # heartbeats (`[[heartbeat]]`): when each expected mail was last seen, and whether the
    # gateway's own `heartbeat:<name>` incident for it is open. Keyed by the configured name.
    """
    CREATE TABLE mail_heartbeats (
        name TEXT PRIMARY KEY,
        service TEXT NOT NULL,
        watched_since REAL NOT NULL,
        last_seen REAL,
        last_message INTEGER,
        missing_since REAL
    );
    """,
    # 8: two-way with PagerDuty. Each incident keeps the routing key that opened it (PagerDuty
    # drops an acknowledge/resolve sent with another key), what PagerDuty last said about it
    # (Webhooks v3) and the case fields of the mail that triggered it (for the helpdesk's
    # notification). `pagerduty_events` holds every webhook delivery, stored before the 2xx and
    # decided later; UNIQUE webhook_id / event_id make a redelivery act once.
    """
    ALTER TABLE incidents ADD COLUMN routing_key TEXT NOT NULL DEFAULT '';
    ALTER TABLE incidents ADD COLUMN pd_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE incidents ADD COLUMN pd_url TEXT NOT NULL DEFAULT '';
    ALTER TABLE incidents ADD COLUMN pd_status TEXT NOT NULL DEFAULT '';
    ALTER TABLE incidents ADD COLUMN assignees TEXT NOT NULL DEFAULT '';
    ALTER TABLE incidents ADD COLUMN priority TEXT NOT NULL DEFAULT '';
    ALTER TABLE incidents ADD COLUMN urgency TEXT NOT NULL DEFAULT '';
    ALTER TABLE incidents ADD COLUMN changed_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE incidents ADD COLUMN case_fields TEXT NOT NULL DEFAULT '{}';
    CREATE INDEX incidents_key ON incidents(incident_key);
    CREATE TABLE pagerduty_events (
        id INTEGER PRIMARY KEY,
        received_at REAL NOT NULL,
        webhook_id TEXT UNIQUE,
        event_id TEXT UNIQUE,
        event_type TEXT NOT NULL DEFAULT '',
        incident_key TEXT NOT NULL DEFAULT '',
        pd_incident TEXT NOT NULL DEFAULT '',
        service TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'pending',
        outcome TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '',
        body TEXT NOT NULL
    );
    CREATE INDEX pagerduty_events_pending ON pagerduty_events(state, id);
    CREATE INDEX pagerduty_events_key ON pagerduty_events(incident_key);
    """,
    # storm: absorbed repeat triggers are counted on their incident (count, when, the latest
    # details), and a trigger that opens an incident is claimed ahead of busy keys' items.
    """
    ALTER TABLE incidents ADD COLUMN coalesced INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE incidents ADD COLUMN coalesced_at REAL;
    ALTER TABLE incidents ADD COLUMN latest_details TEXT NOT NULL DEFAULT '';
    ALTER TABLE outbox ADD COLUMN priority INTEGER NOT NULL DEFAULT 1;
    """,
    # which node accepted each mail and which recorded each item's last attempt (several nodes
    # can share one PostgreSQL store; on SQLite it is always this host).
    """
    ALTER TABLE messages ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE outbox ADD COLUMN delivered_by TEXT NOT NULL DEFAULT '';
    """,
    # 11: each rate-limited key's next free send slot (a hash of the routing key, never the
    # key), shared by every worker of the store: with PostgreSQL, by every node
    """
    CREATE TABLE send_slots (key_hash TEXT PRIMARY KEY, next_at REAL NOT NULL);
    """,
    # 12: the lookups outside the hot path that scanned a growing table: a PagerDuty webhook
    # finds its incident by PagerDuty's id; a mail's page lists the events of that mail
    """
    CREATE INDEX incidents_pd_id ON incidents(pd_id);
    CREATE INDEX events_message ON events(message);
    """,
)
