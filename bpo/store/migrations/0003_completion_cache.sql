-- Greedy completions of targets and judges, keyed by model, version, exact messages and sampling parameters
-- (bpo/engines/cached.py): a repeated request is answered from here instead of by the model.
CREATE TABLE completion_cache (
    key         text PRIMARY KEY,
    model       text NOT NULL,
    completion  jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    hits        bigint NOT NULL DEFAULT 0
);
