-- Analyst views over the lake views (run by core.warehouse.refresh_views after the per-table views).
-- They reference only declared columns, so they also work on an empty warehouse (typed empty views).

-- Each pair once: a pair ingested on several days keeps its earliest partition.
CREATE OR REPLACE VIEW pairs_current AS
SELECT domain, partition, pair_id, caption_raw, caption, caption_simplified, image_sha256, width, height, split,
       source_file, source_pos
FROM pairs
QUALIFY row_number() OVER (PARTITION BY domain, pair_id ORDER BY partition, source_file, source_pos) = 1;

-- Triples as facts with their ids, each distinct fact once (earliest partition), with entity degrees. kg_triples
-- holds names (the keys); ids and degrees come from kg_entities / kg_relations (one row per name and domain).
CREATE OR REPLACE VIEW kg_facts AS
WITH t AS (
    SELECT * FROM kg_triples
    QUALIFY row_number() OVER (PARTITION BY domain, head, relation, tail ORDER BY partition, source_file, source_pos) = 1
)
SELECT t.domain, t.partition, h.entity_id AS head_id, t.head, r.relation_id, t.relation, coalesce(r.is_alias, false) AS is_alias,
       tl.entity_id AS tail_id, t.tail, h.degree AS head_degree, tl.degree AS tail_degree, t.source_file, t.source_pos
FROM t
LEFT JOIN kg_entities h ON h.domain = t.domain AND h.name = t.head
LEFT JOIN kg_entities tl ON tl.domain = t.domain AND tl.name = t.tail
LEFT JOIN kg_relations r ON r.domain = t.domain AND r.name = t.relation;

-- One row per (stage, domain, ingest partition): the '*' total rows of ingest_stats.
CREATE OR REPLACE VIEW ingest_summary AS
SELECT stage, domain, partition, rows_in, accepted, quarantined, duplicates,
       round(accepted / nullif(rows_in, 0), 4) AS accepted_share, reasons, seconds
FROM ingest_stats
WHERE source_file = '*';

-- Rejected rows per stage and reason, with one example.
CREATE OR REPLACE VIEW quarantine_summary AS
SELECT stage, domain, reason, count(*) AS rows, count(DISTINCT source_file) AS files,
       min(partition) AS first_partition, max(partition) AS last_partition,
       arg_min(source_file || ':' || source_pos, source_file || ':' || lpad(source_pos::VARCHAR, 20, '0')) AS example
FROM quarantine
GROUP BY stage, domain, reason;
