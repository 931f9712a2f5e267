-- ingest kg: every distinct raw name of this run (heads, relations and tails share one mapping:
-- an entity id and a relation id of the same name differ only in their prefix).
SELECT DISTINCT raw FROM (SELECT h AS raw FROM staged UNION ALL SELECT r FROM staged UNION ALL SELECT t FROM staged)
