-- ingest kg: rebuild kg_relations of one domain from `t`, its distinct triples across every current
-- kg_triples partition; a relation's triples are its distinct triples.
SELECT relation_id, min(relation) AS name, list_contains($alias_relations, min(relation)) AS is_alias,
       count(*) AS triples, $domain AS domain
FROM t GROUP BY relation_id
ORDER BY relation_id
