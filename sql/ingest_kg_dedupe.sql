-- ingest kg: kg_triples rows (without domain/partition/source columns, which kg.py adds from ord) in
-- input order, names joined in DuckDB. Used when this run has more distinct names than --name-cache;
-- otherwise kg.py streams `firsts` ordered by ord and looks names up in an Arrow copy of `canon`
-- (a sort of four integers instead of ten columns).
SELECT f.ord, 'e' || h.hash AS head_id, 'r' || r.hash AS relation_id, 'e' || t.hash AS tail_id,
       h.name AS head, r.name AS relation, t.name AS tail, h.simplified AS head_simplified, t.simplified AS tail_simplified
FROM firsts f JOIN canon h ON f.hn = h.nid JOIN canon r ON f.rn = r.nid JOIN canon t ON f.tn = t.nid
ORDER BY f.ord
