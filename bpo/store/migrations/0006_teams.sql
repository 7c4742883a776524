-- Callers are teams: each authenticates with bearer tokens (stored only as SHA-256 hashes), owns its jobs,
-- and has quotas the operator sets. Usage per team and day feeds the quotas, the reports and the metrics.
CREATE TABLE teams (
    team_id     uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    admin       boolean NOT NULL DEFAULT false,
    disabled    boolean NOT NULL DEFAULT false,
    quotas      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_tokens (
    token_id      uuid PRIMARY KEY,
    team_id       uuid NOT NULL REFERENCES teams (team_id) ON DELETE CASCADE,
    token_hash    text NOT NULL UNIQUE,
    prefix        text NOT NULL,
    description   text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    last_used_at  timestamptz
);

-- Jobs from before teams existed belong to nobody: only an admin sees them.
ALTER TABLE jobs ADD COLUMN team_id uuid REFERENCES teams (team_id);
CREATE INDEX jobs_team_state ON jobs (team_id, state);

CREATE TABLE team_usage (
    team_id     uuid NOT NULL REFERENCES teams (team_id) ON DELETE CASCADE,
    day         date NOT NULL,
    role        text NOT NULL CHECK (role IN ('optimizer', 'target', 'judge', 'submitted')),
    tokens_in   bigint NOT NULL DEFAULT 0,
    tokens_out  bigint NOT NULL DEFAULT 0,
    items       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (team_id, day, role)
);
