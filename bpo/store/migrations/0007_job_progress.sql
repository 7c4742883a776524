-- A job's progress, kept as its items change state, so that GetJob and WatchJob read a few rows instead of
-- counting every item of the job on every call (a million-item job, several watchers, twice a second).
-- Writers only INSERT a row of increments, in the same statement as the item change they count: no row is
-- updated by two stages at once, so counting never makes one stage wait for another. The jobs service's sweep
-- folds each job's rows into one now and then; a reader sums what is there.
CREATE TABLE job_progress (
    job_id           uuid NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    items            bigint NOT NULL DEFAULT 0,
    rejected         bigint NOT NULL DEFAULT 0,
    rewrite_done     bigint NOT NULL DEFAULT 0,
    rewrite_failed   bigint NOT NULL DEFAULT 0,
    generate_done    bigint NOT NULL DEFAULT 0,
    generate_failed  bigint NOT NULL DEFAULT 0,
    judge_done       bigint NOT NULL DEFAULT 0,
    judge_failed     bigint NOT NULL DEFAULT 0,
    -- Items by final status: done, failed (at any stage), cancelled.
    done             bigint NOT NULL DEFAULT 0,
    failed           bigint NOT NULL DEFAULT 0,
    cancelled        bigint NOT NULL DEFAULT 0
);
CREATE INDEX job_progress_job ON job_progress (job_id);

INSERT INTO job_progress (job_id, items, rewrite_done, rewrite_failed, generate_done, generate_failed, judge_done,
                          judge_failed, done, failed, cancelled)
SELECT job_id, count(*),
       count(rewrite), count(*) FILTER (WHERE failed_stage = 'rewrite'),
       count(answers), count(*) FILTER (WHERE failed_stage = 'generate'),
       count(verdict), count(*) FILTER (WHERE failed_stage = 'judge'),
       count(*) FILTER (WHERE status = 'done'), count(*) FILTER (WHERE status = 'failed'),
       count(*) FILTER (WHERE status = 'cancelled')
FROM items GROUP BY job_id;
INSERT INTO job_progress (job_id, rejected) SELECT job_id, count(*) FROM rejected_lines GROUP BY job_id;

-- ExportJob pages through a job's items in corpus order.
CREATE INDEX items_job_line ON items (job_id, line, source_id);
