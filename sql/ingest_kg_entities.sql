-- ingest kg: kg_entities of one domain from `ent_ends` (name, degree: distinct triples touching it as head or tail),
-- `ent_simp` (the names OpenCC simplifies) and `ent_aliases` (tails of alias relations, 别名 / 又称 / ..., with this
-- head), built by ingest_kg_run_tables.sql or ingest_kg_lake_tables.sql. Ids: 'e' || sha256(domain \0 name)[:15].
SELECT 'e' || substr(sha256($prefix || e.name), 1, 15) AS entity_id, e.name, coalesce(s.simplified, e.name) AS name_simplified,
       coalesce(a.aliases, []::VARCHAR[]) AS aliases, e.degree, $domain AS domain
FROM ent_ends e LEFT JOIN ent_simp s USING (name) LEFT JOIN ent_aliases a USING (name)
ORDER BY entity_id
