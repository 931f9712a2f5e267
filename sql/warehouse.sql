-- Tables the project owns inside warehouse.duckdb (created on first connect; idempotent).
-- Lake tables are views generated from the partition manifests (see core/warehouse.py).
CREATE TABLE IF NOT EXISTS lineage_runs (
    run_id VARCHAR PRIMARY KEY,
    stage VARCHAR NOT NULL,
    domain VARCHAR,
    partition VARCHAR,
    status VARCHAR NOT NULL,          -- running | ok | cached | failed
    cache_key VARCHAR,
    cached_from VARCHAR,              -- run_id whose outputs a cache hit reused
    config_json VARCHAR,
    code_version VARCHAR,
    started_at TIMESTAMP,
    ended_at TIMESTAMP,
    seconds DOUBLE,
    rows_in BIGINT,
    rows_out BIGINT,
    rows_quarantined BIGINT,
    rows_duplicate BIGINT,
    parent_run_id VARCHAR,            -- e.g. the Airflow task instance that launched it
    message VARCHAR,
    extra_json VARCHAR
);
CREATE TABLE IF NOT EXISTS lineage_io (
    run_id VARCHAR NOT NULL,
    direction VARCHAR NOT NULL,       -- input | output
    uri VARCHAR NOT NULL,
    fingerprint VARCHAR,
    rows BIGINT,
    schema_name VARCHAR
);
CREATE TABLE IF NOT EXISTS stage_cache (
    stage VARCHAR NOT NULL,
    domain VARCHAR NOT NULL,
    partition VARCHAR NOT NULL,
    cache_key VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    report_json VARCHAR NOT NULL,
    PRIMARY KEY (stage, domain, partition)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id VARCHAR NOT NULL,
    stage VARCHAR NOT NULL,
    domain VARCHAR,
    subject VARCHAR,                  -- model dir / dataset the metric is about
    subject_fingerprint VARCHAR,
    data_fingerprint VARCHAR,
    name VARCHAR NOT NULL,
    value DOUBLE,
    step BIGINT,
    recorded_at TIMESTAMP DEFAULT current_timestamp,
    extra_json VARCHAR
);
