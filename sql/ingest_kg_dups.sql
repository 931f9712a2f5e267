-- ingest kg: the rows to drop as duplicates of an earlier data row (same normalised head, relation and tail; the
-- first occurrence, by input file then line, is kept). `keys` (from kg.py) holds the 64-bit triple hashes `k` seen
-- more than once; only rows with such a hash are compared as strings, so a hash collision costs a comparison, never
-- a triple. Rows in `skip` take no part (they are not data).
WITH candidates AS (
    SELECT f, rid, row_number() OVER (PARTITION BY h, r, t ORDER BY f, rid) AS n
    FROM staged s
    WHERE k IN (SELECT k FROM keys) AND NOT EXISTS (SELECT 1 FROM skip x WHERE x.f = s.f AND x.rid = s.rid)
)
SELECT f, rid FROM candidates WHERE n > 1
