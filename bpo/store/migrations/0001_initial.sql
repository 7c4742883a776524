-- Jobs, their items with every stage's output, the rewrite cache and the model registry.
-- Postgres is the source of truth for every item's state; Kafka only carries work between stages.

CREATE TABLE jobs (
    job_id       uuid PRIMARY KEY,
    name         text NOT NULL DEFAULT '',
    spec         jsonb NOT NULL,
    stages       text[] NOT NULL,
    state        text NOT NULL CHECK (state IN ('running', 'succeeded', 'cancelled')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);

CREATE TABLE items (
    item_id           uuid PRIMARY KEY,
    job_id            uuid NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    source_id         text NOT NULL,
    line              integer NOT NULL,
    prompt            text NOT NULL,
    context           text,
    category          text,
    prompt_hash       text NOT NULL,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'rewritten', 'answered', 'done', 'failed', 'cancelled')),
    -- Each stage writes its output once (WHERE <column> IS NULL): a redelivered message never overwrites.
    rewrite           jsonb,
    rewrite_at        timestamptz,
    answers           jsonb,
    answers_at        timestamptz,
    verdict           jsonb,
    verdict_at        timestamptz,
    winner            text CHECK (winner IN ('optimized', 'original', 'tie')),
    cache_hit         boolean,
    fallback_reason   text,
    rewrite_tokens_in  integer NOT NULL DEFAULT 0,
    rewrite_tokens_out integer NOT NULL DEFAULT 0,
    target_tokens_in   integer NOT NULL DEFAULT 0,
    target_tokens_out  integer NOT NULL DEFAULT 0,
    judge_tokens_in    integer NOT NULL DEFAULT 0,
    judge_tokens_out   integer NOT NULL DEFAULT 0,
    failed_stage      text,
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    UNIQUE (job_id, source_id)
);
CREATE INDEX items_job_status ON items (job_id, status);

-- Corpus lines that could not be read: failures of the job, with their reasons.
CREATE TABLE rejected_lines (
    job_id  uuid NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    line    integer NOT NULL,
    reason  text NOT NULL,
    PRIMARY KEY (job_id, line)
);

CREATE TABLE rewrite_cache (
    prompt_hash    text NOT NULL,
    model_version  text NOT NULL,
    params_hash    text NOT NULL,
    rewrite        jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    hits           bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (prompt_hash, model_version, params_hash)
);

CREATE TABLE model_registry (
    name           text NOT NULL,
    version        text NOT NULL,
    base_model     text NOT NULL DEFAULT '',
    source         text NOT NULL DEFAULT '',
    manifest_hash  text NOT NULL DEFAULT '',
    metrics        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

CREATE TABLE model_aliases (
    alias       text PRIMARY KEY,
    name        text NOT NULL,
    version     text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (name, version) REFERENCES model_registry (name, version)
);
