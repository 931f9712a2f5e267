-- ingest kg: the distinct (head, relation, tail) ids of a domain across every current kg_triples
-- partition (`triples` view); names follow from ids (id = hash of the name), so ids suffice.
SELECT DISTINCT head_id, relation_id, tail_id FROM triples
