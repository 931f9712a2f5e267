-- ingest kg: kg_relations of one domain from `rel_counts` (name, distinct triples), built by
-- ingest_kg_run_tables.sql or ingest_kg_lake_tables.sql. Ids: 'r' || sha256(domain \0 name)[:15].
SELECT 'r' || substr(sha256($prefix || name), 1, 15) AS relation_id, name, list_contains($alias_relations, name) AS is_alias,
       triples, $domain AS domain
FROM rel_counts
ORDER BY relation_id
