-- ingest kg: every distinct raw name of this run's valid rows (heads, relations and tails share one
-- mapping: an entity id and a relation id of the same name differ only in their prefix).
SELECT DISTINCT raw FROM (
    SELECT h AS raw FROM staged WHERE bad IS NULL UNION ALL
    SELECT r FROM staged WHERE bad IS NULL UNION ALL
    SELECT t FROM staged WHERE bad IS NULL
)
