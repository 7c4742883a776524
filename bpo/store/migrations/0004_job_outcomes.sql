-- A finished job says what happened: succeeded (no item failed), partially_failed (some finished, some failed
-- or were rejected at submission), failed (none finished), or cancelled.
ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('running', 'succeeded', 'partially_failed', 'failed', 'cancelled'));
-- Jobs that ended before outcomes were told apart: what their items say now.
UPDATE jobs j SET state = CASE
        WHEN c.done = 0 THEN 'failed'
        WHEN c.failed > 0 THEN 'partially_failed'
        ELSE 'succeeded' END
FROM (
    SELECT jobs.job_id,
           (SELECT count(*) FROM items i WHERE i.job_id = jobs.job_id AND i.status = 'done') AS done,
           (SELECT count(*) FROM items i WHERE i.job_id = jobs.job_id AND i.status = 'failed')
             + (SELECT count(*) FROM rejected_lines r WHERE r.job_id = jobs.job_id) AS failed
    FROM jobs WHERE jobs.state = 'succeeded'
) AS c
WHERE j.job_id = c.job_id;
