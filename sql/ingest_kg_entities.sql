-- ingest kg: rebuild kg_entities of one domain from `t`, its distinct triples across every current
-- kg_triples partition. Degree counts distinct triples touching the entity (one GROUP BY over heads
-- and tails also picks the name: names are 1:1 with ids, so min(name) is the name); alias triples
-- (relation in $alias_relations) fold their tail into the head's aliases (the tail stays an entity
-- too, so no triple dangles).
WITH ends AS (
    SELECT entity_id, count(*) AS degree, min(name) AS name, min(name_simplified) AS name_simplified
    FROM (SELECT head_id AS entity_id, head AS name, head_simplified AS name_simplified FROM t
          UNION ALL SELECT tail_id, tail, tail_simplified FROM t)
    GROUP BY entity_id
), aliases AS (
    SELECT head_id AS entity_id, list(DISTINCT tail ORDER BY tail) AS aliases
    FROM t WHERE list_contains($alias_relations, relation) AND tail <> head GROUP BY head_id
)
SELECT entity_id, name, name_simplified, coalesce(aliases, []::VARCHAR[]) AS aliases, degree, $domain AS domain
FROM ends LEFT JOIN aliases USING (entity_id)
ORDER BY entity_id
