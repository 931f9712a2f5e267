-- ingest kg: kg_relations of a domain whose only kg_triples partition is the one this run just wrote,
-- from the run's `firsts` and `canon` (see ingest_kg_entities_run.sql).
WITH counts AS (SELECT rn AS nid, count(*) AS triples FROM firsts GROUP BY rn)
SELECT 'r' || k.hash AS relation_id, k.name, list_contains($alias_relations, k.name) AS is_alias, c.triples, $domain AS domain
FROM counts c JOIN canon k ON k.nid = c.nid
ORDER BY relation_id
