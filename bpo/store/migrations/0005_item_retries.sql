-- Failure isolation and liveness (no input, caller or outage may stall the platform or lose an item):
-- * a job is 'submitting' until its whole corpus arrived; stages never see its items before that, and an
--   aborted submission is deleted (its heartbeat says whether its stream is still alive);
-- * an item whose stage hit a transient error (an endpoint down, no worker for its model, a batch deadline)
--   is parked until retry_at instead of blocking its partition; after max attempts it fails with the reason;
-- * published_at is when the item was last handed to its next stage's topic: the periodic sweep re-publishes
--   items idle beyond a threshold, so a message lost by the broker delays an item, never loses it.
ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('submitting', 'running', 'succeeded', 'partially_failed', 'failed', 'cancelled'));
ALTER TABLE jobs ADD COLUMN heartbeat_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX jobs_submitting ON jobs (heartbeat_at) WHERE state = 'submitting';
CREATE INDEX jobs_running ON jobs (job_id) WHERE state = 'running';

ALTER TABLE items ADD COLUMN attempts integer NOT NULL DEFAULT 0;
ALTER TABLE items ADD COLUMN retry_at timestamptz;
ALTER TABLE items ADD COLUMN last_error text;
ALTER TABLE items ADD COLUMN published_at timestamptz;
-- Items already in flight count as published now: the sweep looks at them after its idle threshold.
UPDATE items SET published_at = now() WHERE status IN ('pending', 'rewritten', 'answered');

CREATE INDEX items_parked ON items (retry_at)
    WHERE retry_at IS NOT NULL AND status IN ('pending', 'rewritten', 'answered');
CREATE INDEX items_idle ON items (published_at)
    WHERE retry_at IS NULL AND status IN ('pending', 'rewritten', 'answered');
