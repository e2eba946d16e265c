"""The PostgreSQL metadata index's schema, as numbered migrations (no I/O here).

A migration is applied once, in its own transaction with the others pending, and its
number recorded in ``schema_version``; never edit one that has shipped, add the next.
Text columns that are sorted or paged (repository and tag names, digests) use the "C"
collation: byte order, as SQLite compares and as OCI's tag and catalog pagination
expect, whatever locale the database was created with.
"""

from __future__ import annotations

_V1 = """
CREATE TABLE repositories (
    id BIGSERIAL PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL UNIQUE,
    created DOUBLE PRECISION NOT NULL,
    -- This repository's hybrid logical clock: only versions of one repository's tags are
    -- ever compared, and its writers hold this row's lock anyway.
    clock BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE blobs (
    digest TEXT COLLATE "C" PRIMARY KEY,
    size BIGINT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
CREATE TABLE blob_links (
    repo_id BIGINT NOT NULL REFERENCES repositories(id),
    digest TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (repo_id, digest)
);
CREATE INDEX blob_links_digest ON blob_links(digest);
CREATE TABLE manifests (
    repo_id BIGINT NOT NULL REFERENCES repositories(id),
    digest TEXT COLLATE "C" NOT NULL,
    media_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    content BYTEA NOT NULL,
    artifact_type TEXT,
    subject TEXT COLLATE "C",
    annotations TEXT,
    created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (repo_id, digest)
);
CREATE INDEX manifests_subject ON manifests(repo_id, subject) WHERE subject IS NOT NULL;
CREATE TABLE manifest_refs (
    repo_id BIGINT NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    child TEXT COLLATE "C" NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('blob', 'manifest')),
    PRIMARY KEY (repo_id, digest, child)
);
CREATE INDEX manifest_refs_child ON manifest_refs(child);
CREATE TABLE tags (
    repo_id BIGINT NOT NULL REFERENCES repositories(id),
    name TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    version BIGINT NOT NULL,
    origin TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (repo_id, name)
);
CREATE INDEX tags_digest ON tags(repo_id, digest);
CREATE TABLE tombstones (
    repo_id BIGINT NOT NULL REFERENCES repositories(id),
    name TEXT COLLATE "C" NOT NULL,
    version BIGINT NOT NULL,
    origin TEXT COLLATE "C" NOT NULL,
    deleted DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (repo_id, name)
);
-- The change log. An entry is inserted without a seq; changelog.number gives committed
-- entries their seq afterwards, in the order they became visible (see changelog.py).
CREATE TABLE changes (
    id BIGSERIAL PRIMARY KEY,
    seq BIGINT UNIQUE,
    repo TEXT NOT NULL,
    op TEXT NOT NULL,
    tag TEXT,
    digest TEXT,
    version BIGINT NOT NULL,
    origin TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    actor TEXT
);
CREATE INDEX changes_unnumbered ON changes(id) WHERE seq IS NULL;
CREATE TABLE change_head (id INTEGER PRIMARY KEY CHECK (id = 0), last BIGINT NOT NULL);
INSERT INTO change_head(id, last) VALUES (0, 0);
CREATE TABLE peer_cursors (peer TEXT PRIMARY KEY, seq BIGINT NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# A committed change-log entry wakes the replica delivering it (postgres_listener): one
# notification per transaction, sent at commit, instead of waiting for the next poll.
_V2 = """
CREATE FUNCTION berth_changes_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('berth_changes', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_notify AFTER INSERT ON changes
    FOR EACH STATEMENT EXECUTE FUNCTION berth_changes_notify();
"""

# What the replica running an elected task reports (a peer's delivery figures), so that
# every replica's status endpoint shows the same (postgres_election).
_V3 = """
CREATE TABLE task_reports (
    task TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    report TEXT NOT NULL,
    updated DOUBLE PRECISION NOT NULL
);
"""

# Counts the changes to a repository's tags: what a cached tag list is valid for. A
# trigger keeps it, so that replicas of an older version, still running during a rolling
# update, count their tag writes too.
_V4 = """
ALTER TABLE repositories ADD COLUMN tags_changed BIGINT NOT NULL DEFAULT 0;
CREATE FUNCTION berth_tags_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE repositories SET tags_changed = tags_changed + 1
        WHERE id = CASE WHEN TG_OP = 'DELETE' THEN OLD.repo_id ELSE NEW.repo_id END;
    RETURN NULL;
END
$$;
CREATE TRIGGER tags_changed AFTER INSERT OR UPDATE OR DELETE ON tags
    FOR EACH ROW EXECUTE FUNCTION berth_tags_changed();
"""

_BLOB_SIZE = "COALESCE((SELECT size FROM blobs WHERE digest = NEW.child), 0)"

# Per-repository usage (storage/index_usage.py), kept by triggers: a blob counts once per
# repository (repository_blobs holds its references and the size counted), manifests
# and tags count too. What is already stored is counted at the end.
_V5 = f"""
ALTER TABLE repositories ADD COLUMN stored_bytes BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN tag_count BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN manifest_count BIGINT NOT NULL DEFAULT 0;
CREATE TABLE repository_blobs (
    repo_id BIGINT NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    size BIGINT NOT NULL,
    refs BIGINT NOT NULL,
    PRIMARY KEY (repo_id, digest)
);
CREATE FUNCTION berth_usage_refs() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    counted BIGINT;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.kind <> 'blob' THEN RETURN NULL; END IF;
        INSERT INTO repository_blobs AS rb (repo_id, digest, size, refs)
            VALUES (NEW.repo_id, NEW.child, {_BLOB_SIZE}, 1)
            ON CONFLICT (repo_id, digest) DO UPDATE SET refs = rb.refs + 1
            RETURNING CASE WHEN rb.refs = 1 THEN rb.size ELSE 0 END INTO counted;
        IF counted <> 0 THEN
            UPDATE repositories SET stored_bytes = stored_bytes + counted
                WHERE id = NEW.repo_id;
        END IF;
    ELSE
        IF OLD.kind <> 'blob' THEN RETURN NULL; END IF;
        UPDATE repository_blobs SET refs = refs - 1
            WHERE repo_id = OLD.repo_id AND digest = OLD.child
            RETURNING CASE WHEN refs <= 0 THEN size END INTO counted;
        IF counted IS NOT NULL THEN
            DELETE FROM repository_blobs WHERE repo_id = OLD.repo_id AND digest = OLD.child;
            UPDATE repositories SET stored_bytes = stored_bytes - counted
                WHERE id = OLD.repo_id;
        END IF;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER usage_refs AFTER INSERT OR DELETE ON manifest_refs
    FOR EACH ROW EXECUTE FUNCTION berth_usage_refs();
CREATE FUNCTION berth_usage_manifests() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE repositories SET manifest_count = manifest_count + 1,
            stored_bytes = stored_bytes + NEW.size WHERE id = NEW.repo_id;
    ELSE
        UPDATE repositories SET manifest_count = manifest_count - 1,
            stored_bytes = stored_bytes - OLD.size WHERE id = OLD.repo_id;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER usage_manifests AFTER INSERT OR DELETE ON manifests
    FOR EACH ROW EXECUTE FUNCTION berth_usage_manifests();
CREATE FUNCTION berth_usage_tags() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE repositories SET tag_count = tag_count + 1 WHERE id = NEW.repo_id;
    ELSE
        UPDATE repositories SET tag_count = tag_count - 1 WHERE id = OLD.repo_id;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER usage_tags AFTER INSERT OR DELETE ON tags
    FOR EACH ROW EXECUTE FUNCTION berth_usage_tags();
INSERT INTO repository_blobs(repo_id, digest, size, refs)
    SELECT r.repo_id, r.child, COALESCE(MAX(b.size), 0), COUNT(*)
    FROM manifest_refs r LEFT JOIN blobs b ON b.digest = r.child
    WHERE r.kind = 'blob' GROUP BY r.repo_id, r.child;
UPDATE repositories SET
    stored_bytes = COALESCE((SELECT SUM(size) FROM repository_blobs
        WHERE repo_id = repositories.id), 0)
        + COALESCE((SELECT SUM(size) FROM manifests WHERE repo_id = repositories.id), 0),
    tag_count = (SELECT COUNT(*) FROM tags WHERE repo_id = repositories.id),
    manifest_count = (SELECT COUNT(*) FROM manifests WHERE repo_id = repositories.id);
"""

# Failed-authentication meters shared by every replica (storage/auth_failures.py).
_V6 = """
CREATE TABLE auth_failures (
    meter TEXT NOT NULL,
    key BYTEA NOT NULL,
    drained_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (meter, key)
);
CREATE INDEX auth_failures_drained ON auth_failures (drained_at);
"""

# Web UI sessions ended by logging out (storage/ended_sessions.py).
_V7 = """
CREATE TABLE ended_sessions (
    token_id TEXT PRIMARY KEY,
    expires_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX ended_sessions_ended ON ended_sessions (ended_at);
"""

# When a manifest lost a tag, an index listing it or its subject: the retention of
# untagged manifests counts from then (index_tags.untagged_manifests). Triggers, so that
# replicas of an older version, during a rolling update, stamp it too.
_V8 = """
-- Existing rows count as let go of now (when their tags last moved is not known); a
-- default evaluated once, so no row is rewritten, then none for new rows.
ALTER TABLE manifests ADD COLUMN released DOUBLE PRECISION DEFAULT extract(epoch FROM now());
ALTER TABLE manifests ALTER COLUMN released DROP DEFAULT;
CREATE FUNCTION berth_released_tag() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR OLD.digest <> NEW.digest THEN
        UPDATE manifests SET released = extract(epoch FROM clock_timestamp())
            WHERE repo_id = OLD.repo_id AND digest = OLD.digest;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER released_tags AFTER UPDATE OR DELETE ON tags
    FOR EACH ROW EXECUTE FUNCTION berth_released_tag();
CREATE FUNCTION berth_released_listing() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE manifests SET released = extract(epoch FROM clock_timestamp())
        WHERE repo_id = OLD.repo_id AND digest = OLD.child;
    RETURN NULL;
END
$$;
CREATE TRIGGER released_listings AFTER DELETE ON manifest_refs
    FOR EACH ROW WHEN (OLD.kind = 'manifest') EXECUTE FUNCTION berth_released_listing();
CREATE FUNCTION berth_released_subject() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE manifests SET released = extract(epoch FROM clock_timestamp())
        WHERE repo_id = OLD.repo_id AND subject = OLD.digest;
    RETURN NULL;
END
$$;
CREATE TRIGGER released_subjects AFTER DELETE ON manifests
    FOR EACH ROW EXECUTE FUNCTION berth_released_subject();
"""

# A referrer deleted by digest, with the delete's stamp, and a referrer's clock version
# when first stored: anti-entropy compares the two, so that a copy stored before the
# delete is not brought back (index_tags.delete_manifest).
_V9 = """
ALTER TABLE manifests ADD COLUMN stored_version BIGINT;
CREATE TABLE referrer_tombstones (
    repo_id BIGINT NOT NULL REFERENCES repositories(id),
    digest TEXT COLLATE "C" NOT NULL,
    version BIGINT NOT NULL,
    origin TEXT COLLATE "C" NOT NULL,
    deleted DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (repo_id, digest)
);
CREATE INDEX referrer_tombstones_deleted ON referrer_tombstones (deleted);
"""

# When a replica that has a consumer configured last registered or moved its cursor: the
# log is trimmed past the consumers of every replica's configuration, not only its own
# (changelog.ack).
_V10 = """
ALTER TABLE peer_cursors ADD COLUMN seen DOUBLE PRECISION NOT NULL DEFAULT 0;
"""

# (version, SQL): applied in order, each once.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, _V1),
    (2, _V2),
    (3, _V3),
    (4, _V4),
    (5, _V5),
    (6, _V6),
    (7, _V7),
    (8, _V8),
    (9, _V9),
    (10, _V10),
)

LATEST = MIGRATIONS[-1][0]
