-- Preference data and the optimized-prompt pairs built from it (the paper's step 1), read by training (step 2).

CREATE TABLE preference_records (
    record_id     uuid PRIMARY KEY,            -- uuid5 of (dataset, the record's own id or content hash)
    dataset       text NOT NULL,               -- the name given at import, e.g. 'bpo-val', 'hh-rlhf-harmless'
    source        text NOT NULL,               -- bpo | hh-rlhf | oasst1 | chatbot-arena | alpaca-gpt4 | generic
    licence       text NOT NULL,
    external_id   text NOT NULL DEFAULT '',
    instruction   text NOT NULL,
    context       text,
    chosen        text NOT NULL,
    rejected      text NOT NULL,
    extra         jsonb NOT NULL DEFAULT '{}'::jsonb,   -- source-specific fields (e.g. BPO's own comparison)
    imported_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX preference_records_dataset ON preference_records (dataset);

-- One row per (record, constructor model, prompt version): every decision is kept, dropped ones included.
CREATE TABLE prompt_pairs (
    pair_id            uuid PRIMARY KEY,
    record_id          uuid NOT NULL REFERENCES preference_records (record_id) ON DELETE CASCADE,
    dataset            text NOT NULL,
    constructor_model  text NOT NULL,
    prompt_version     text NOT NULL,
    decision           text NOT NULL,          -- 'kept' or 'dropped:<filter>' (e.g. dropped:too_short, dropped:self_bleu)
    x_user             text NOT NULL,          -- the instruction (with its context joined, as trained on)
    x_opt              text,                   -- the optimized instruction (with its context joined)
    comparison         text,                   -- the constructor's "Detailed Comparison Result"
    raw_output         text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (record_id, constructor_model, prompt_version)
);
CREATE INDEX prompt_pairs_dataset_decision ON prompt_pairs (dataset, decision);
