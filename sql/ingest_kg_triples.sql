-- ingest kg: the kg_triples partition (schemas/kg_triples.json, columns in order) in input order, for
-- DuckDB's own Parquet writer (core.lake.publish_query). `triple_rows` is kg.py's Arrow stream of
-- `firsts` (sorted by ord = file index << 40 | file line) with the names and ids looked up by position
-- in the canon arrays: a scan keeps its order, where a hash join would scramble it and the wide rows
-- would need sorting again. Used when the run has at most --name-cache names;
-- sql/ingest_kg_triples_join.sql otherwise.
SELECT $domain AS domain, $partition AS partition, head_id, relation_id, tail_id, head, relation, tail,
       head_simplified, tail_simplified,
       list_extract($sources, (ord >> 40)::INTEGER + 1) AS source_file, ord & 1099511627775 AS source_pos
FROM triple_rows
