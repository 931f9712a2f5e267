-- ingest kg: rebuild kg_entities of one domain from every current kg_triples partition (`triples` view).
-- Degree counts distinct triples touching the entity; alias triples (relation in $alias_relations)
-- fold their tail into the head's aliases (the tail stays an entity too, so no triple dangles).
WITH t AS (
    SELECT DISTINCT head_id, relation_id, tail_id, head, relation, tail, head_simplified, tail_simplified FROM triples
), ends AS (
    SELECT head_id AS entity_id, head AS name, head_simplified AS name_simplified FROM t
    UNION ALL
    SELECT tail_id, tail, tail_simplified FROM t
), nodes AS (
    SELECT entity_id, min(name) AS name, min(name_simplified) AS name_simplified, count(*) AS degree
    FROM ends GROUP BY entity_id
), aliases AS (
    SELECT head_id AS entity_id, list(DISTINCT tail ORDER BY tail) AS aliases
    FROM t WHERE list_contains($alias_relations, relation) AND tail <> head GROUP BY head_id
)
SELECT entity_id, name, name_simplified, coalesce(aliases, []::VARCHAR[]) AS aliases, degree, $domain AS domain
FROM nodes LEFT JOIN aliases USING (entity_id)
ORDER BY entity_id
