-- ingest kg: the run's line-level and name-level rejects (already in the quarantine schema, in a scratch
-- Parquet file), in input order: file (by its position in the run's inputs), then line.
SELECT * FROM read_parquet($path) ORDER BY list_position($sources, source_file), source_pos
