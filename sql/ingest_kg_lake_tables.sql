-- ingest kg: the inputs of kg_entities / kg_relations of a domain from every current kg_triples partition (view
-- `triples` over the files their manifests list). Partitions may share triples: each distinct triple counts once.
-- (`ent_simp`, the simplified names, comes from kg.py: OpenCC runs in Python.)
CREATE TABLE t AS SELECT DISTINCT head, relation, tail FROM triples;

CREATE TABLE ent_ends AS
SELECT name, count(*) AS degree FROM (SELECT head AS name FROM t UNION ALL SELECT tail FROM t) GROUP BY name;

CREATE TABLE rel_counts AS
SELECT relation AS name, count(*) AS triples FROM t GROUP BY relation;

CREATE TABLE ent_aliases AS
SELECT head AS name, list(DISTINCT tail ORDER BY tail) AS aliases
FROM t WHERE list_contains($alias_relations, relation) AND tail <> head
GROUP BY head;
