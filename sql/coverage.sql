-- Entity coverage of the captions: run as-is in DuckDB against the warehouse
--   duckdb rapid_home/warehouse.duckdb -c "SET VARIABLE domain = 'demo'" -c ".read sql/coverage.sql"
-- or `rapid coverage --domain demo`. Without the variable, every domain is included.
-- Uses the lake views that `rapid` keeps current (pairs, links, kg_entities, kg_relations, kg_triples).
-- A pair ingested on several days counts once (its earliest partition).

CREATE OR REPLACE TEMP VIEW coverage_captions AS
SELECT domain, pair_id, min(partition) AS partition, any_value(caption) AS caption
FROM pairs
WHERE getvariable('domain') IS NULL OR domain = getvariable('domain')
GROUP BY domain, pair_id;

CREATE OR REPLACE TEMP VIEW coverage_links AS
SELECT DISTINCT l.domain, l.pair_id, l.entity_id, l.start, l."end", l.surface, l.method
FROM links l JOIN coverage_captions c USING (domain, pair_id);

-- 1. share of captions with at least one linked entity, per domain
CREATE OR REPLACE TEMP VIEW coverage_by_domain AS
SELECT c.domain,
       count(*) AS captions,
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM coverage_links l WHERE l.domain = c.domain AND l.pair_id = c.pair_id)) AS linked_captions,
       round(linked_captions / count(*), 4) AS coverage,
       (SELECT count(*) FROM coverage_links l WHERE l.domain = c.domain) AS mentions
FROM coverage_captions c
GROUP BY c.domain;

-- 2. entity frequency (mentions and captions per entity)
CREATE OR REPLACE TEMP VIEW coverage_entities AS
SELECT l.domain, l.entity_id, any_value(e.name) AS name, count(*) AS mentions, count(DISTINCT l.pair_id) AS captions,
       count(*) FILTER (WHERE l.method LIKE 'ambiguous%') AS ambiguous_mentions
FROM coverage_links l LEFT JOIN kg_entities e ON e.domain = l.domain AND e.entity_id = l.entity_id
GROUP BY l.domain, l.entity_id;

-- 3. relation frequency: KG relations touching the linked entities (kg_triples holds names; kg_entities the ids)
CREATE OR REPLACE TEMP VIEW coverage_relations AS
SELECT t.domain, t.relation, count(*) AS triples, count(DISTINCT e.entity_id) AS linked_heads
FROM kg_triples t JOIN kg_entities e ON e.domain = t.domain AND e.name = t.head
WHERE (getvariable('domain') IS NULL OR t.domain = getvariable('domain'))
  AND e.entity_id IN (SELECT entity_id FROM coverage_links)
GROUP BY t.domain, t.relation;

-- 4. captions with no entity
CREATE OR REPLACE TEMP VIEW coverage_unlinked_captions AS
SELECT c.domain, c.partition, c.pair_id, c.caption
FROM coverage_captions c
WHERE NOT EXISTS (SELECT 1 FROM coverage_links l WHERE l.domain = c.domain AND l.pair_id = c.pair_id);

-- 5. most frequent unlinked Han 2-4-grams (alias candidates): n-grams outside every linked span
CREATE OR REPLACE TEMP VIEW coverage_alias_candidates AS
WITH pos AS (
    SELECT domain, pair_id, caption, unnest(range(0, length(caption))) AS i FROM coverage_captions
), grams AS (
    SELECT domain, pair_id, i, n, substr(caption, i + 1, n) AS gram
    FROM pos, (SELECT unnest([2, 3, 4]) AS n) ns
    WHERE i + n <= length(caption)
)
SELECT g.domain, g.gram, count(*) AS occurrences, count(DISTINCT g.pair_id) AS captions
FROM grams g
WHERE regexp_full_match(g.gram, '\p{Han}+')
  AND NOT EXISTS (SELECT 1 FROM coverage_links l
                  WHERE l.domain = g.domain AND l.pair_id = g.pair_id AND l.start < g.i + g.n AND l."end" > g.i)
GROUP BY g.domain, g.gram
HAVING count(DISTINCT g.pair_id) >= 2;

-- 6. coverage per ingest date (partition): the trend as data arrives
CREATE OR REPLACE TEMP VIEW coverage_by_partition AS
SELECT c.domain, c.partition, count(*) AS captions,
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM coverage_links l WHERE l.domain = c.domain AND l.pair_id = c.pair_id)) AS linked_captions,
       round(linked_captions / count(*), 4) AS coverage
FROM coverage_captions c
GROUP BY c.domain, c.partition;

SELECT 'by_domain' AS section, * FROM coverage_by_domain ORDER BY domain;
SELECT 'by_partition' AS section, * FROM coverage_by_partition ORDER BY domain, partition;
SELECT 'top_entities' AS section, * FROM coverage_entities ORDER BY mentions DESC, entity_id LIMIT 20;
SELECT 'relations' AS section, * FROM coverage_relations ORDER BY triples DESC, relation LIMIT 20;
SELECT 'unlinked_captions' AS section, * FROM coverage_unlinked_captions ORDER BY domain, pair_id LIMIT 20;
SELECT 'alias_candidates' AS section, * FROM coverage_alias_candidates ORDER BY captions DESC, occurrences DESC, gram LIMIT 20;
