-- One training/evaluation metric row (rapid_pipeline.train.common.log_metrics). Values are bound parameters.
INSERT INTO metrics (run_id, stage, domain, subject, subject_fingerprint, data_fingerprint, name, value, step, extra_json)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?);
