-- ingest kg: rebuild kg_entities of one domain from every current kg_triples partition (`triples`
-- view, `t` = its distinct id triples). Degree counts distinct triples touching the entity; alias
-- triples (relation in $alias_relations) fold their tail into the head's aliases (the tail stays an
-- entity too, so no triple dangles). Names are 1:1 with ids, so min(name) is the name.
WITH degrees AS (
    SELECT entity_id, count(*) AS degree FROM (SELECT head_id AS entity_id FROM t UNION ALL SELECT tail_id FROM t)
    GROUP BY entity_id
), names AS (
    SELECT entity_id, min(name) AS name, min(name_simplified) AS name_simplified
    FROM (SELECT head_id AS entity_id, head AS name, head_simplified AS name_simplified FROM triples
          UNION ALL SELECT tail_id, tail, tail_simplified FROM triples)
    GROUP BY entity_id
), aliases AS (
    SELECT head_id AS entity_id, list(DISTINCT tail ORDER BY tail) AS aliases
    FROM triples WHERE list_contains($alias_relations, relation) AND tail <> head GROUP BY head_id
)
SELECT entity_id, name, name_simplified, coalesce(aliases, []::VARCHAR[]) AS aliases, degree, $domain AS domain
FROM degrees JOIN names USING (entity_id) LEFT JOIN aliases USING (entity_id)
ORDER BY entity_id
