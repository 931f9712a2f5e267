-- ingest kg: the distinct triples of a domain across its current kg_triples partitions (`triples`
-- view), with their names. Names follow from ids (id = hash of the name), so any_value is exact.
-- (A domain with one partition is rebuilt from the run's own tables: ingest_kg_entities_run.sql.)
SELECT head_id, relation_id, tail_id, any_value(head) AS head, any_value(relation) AS relation,
       any_value(tail) AS tail, any_value(head_simplified) AS head_simplified, any_value(tail_simplified) AS tail_simplified
FROM triples GROUP BY head_id, relation_id, tail_id
