-- When each row of a job's progress was counted, so that the sweep can tell a lost message from a queued one.
-- An item published long ago and not done is only "idle" (its message lost, to be published again) when its job
-- has counted no progress for as long: a million-item job waits in its topics for hours, every message of it
-- intact, and re-publishing what is merely queued would flood the topics with copies.
ALTER TABLE job_progress ADD COLUMN recorded_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX job_progress_job_recorded ON job_progress (job_id, recorded_at);
DROP INDEX job_progress_job;
