-- ingest kg: rebuild kg_relations of one domain from every current kg_triples partition (`triples`
-- view, `t` = its distinct id triples); a relation's triples are its distinct id triples.
WITH counts AS (SELECT relation_id, count(*) AS triples FROM t GROUP BY relation_id),
names AS (SELECT relation_id, min(relation) AS name FROM triples GROUP BY relation_id)
SELECT relation_id, name, list_contains($alias_relations, name) AS is_alias, triples, $domain AS domain
FROM counts JOIN names USING (relation_id)
ORDER BY relation_id
