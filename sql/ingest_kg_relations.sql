-- ingest kg: rebuild kg_relations of one domain from every current kg_triples partition (`triples` view).
SELECT relation_id, min(relation) AS name, list_contains($alias_relations, min(relation)) AS is_alias,
       count(*) AS triples, $domain AS domain
FROM (SELECT DISTINCT head_id, relation_id, tail_id, relation FROM triples)
GROUP BY relation_id
ORDER BY relation_id
