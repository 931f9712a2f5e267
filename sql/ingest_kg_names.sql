-- ingest kg: every raw name of the run with its number of uses, in one pass per role: `ends` counts uses as head
-- or tail (an entity's degree before rows are dropped), `rels` uses as relation. Rows that are not data (header,
-- bad, and later rejected or duplicate rows) are counted here and taken off again (ingest_kg_run_tables.sql), so
-- the big scans need no filter.
CREATE TABLE ends AS
SELECT raw, count(*) AS n FROM (SELECT h AS raw FROM staged UNION ALL SELECT t FROM staged) WHERE raw IS NOT NULL GROUP BY raw;
CREATE TABLE rels AS
SELECT r AS raw, count(*) AS n FROM staged WHERE r IS NOT NULL GROUP BY r;
