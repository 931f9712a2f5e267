-- ingest kg: the same rows as sql/ingest_kg_triples.sql when the run has more distinct names than
-- --name-cache (no list of every name in memory): hash joins on canon, then DuckDB sorts (and spills).
SELECT $domain AS domain, $partition AS partition,
       'e' || h.hash AS head_id, 'r' || r.hash AS relation_id, 'e' || t.hash AS tail_id,
       h.name AS head, r.name AS relation, t.name AS tail, h.simplified AS head_simplified, t.simplified AS tail_simplified,
       list_extract($sources, (f.ord >> 40)::INTEGER + 1) AS source_file, f.ord & 1099511627775 AS source_pos
FROM firsts f JOIN canon h ON f.hn = h.nid JOIN canon r ON f.rn = r.nid JOIN canon t ON f.tn = t.nid
ORDER BY f.ord
