-- ingest kg: the inputs of kg_entities / kg_relations when the partition this run wrote is the domain's only one,
-- from the run's own tables (nothing read back from Parquet; the same rows as ingest_kg_lake_tables.sql over the
-- lake, which a test checks byte for byte). Counts are per normal form: `ends` / `rels` counted raw names (`changed`
-- maps the few that normalise to something else; a rejected one has no normal form), less the uses by the rows in
-- `skip` (renamed in place already, so their names are normal forms; a rejected raw name is never a normal form, as
-- kg._normalise_one makes sure, so it takes nothing off).
CREATE TABLE skipped AS
SELECT s.h, s.r, s.t FROM staged s SEMI JOIN skip k ON k.f = s.f AND k.rid = s.rid;

CREATE TABLE ent_ends AS
WITH counted AS (
    SELECT coalesce(c.name, e.raw) AS name, sum(e.n) AS n
    FROM ends e LEFT JOIN changed c ON c.raw = e.raw WHERE c.reason IS NULL GROUP BY 1
), dropped AS (
    SELECT name, count(*) AS n FROM (SELECT h AS name FROM skipped UNION ALL SELECT t FROM skipped) GROUP BY name
)
SELECT c.name, (c.n - coalesce(d.n, 0))::BIGINT AS degree
FROM counted c LEFT JOIN dropped d USING (name) WHERE c.n > coalesce(d.n, 0);

CREATE TABLE rel_counts AS
WITH counted AS (
    SELECT coalesce(c.name, e.raw) AS name, sum(e.n) AS n
    FROM rels e LEFT JOIN changed c ON c.raw = e.raw WHERE c.reason IS NULL GROUP BY 1
), dropped AS (
    SELECT r AS name, count(*) AS n FROM skipped GROUP BY r
)
SELECT c.name, (c.n - coalesce(d.n, 0))::BIGINT AS triples
FROM counted c LEFT JOIN dropped d USING (name) WHERE c.n > coalesce(d.n, 0);

CREATE TABLE ent_simp AS
SELECT DISTINCT name, simplified FROM changed WHERE reason IS NULL AND simplified <> name;

CREATE TABLE ent_aliases AS
SELECT s.h AS name, list(DISTINCT s.t ORDER BY s.t) AS aliases
FROM staged s ANTI JOIN skip k ON k.f = s.f AND k.rid = s.rid
WHERE list_contains($alias_relations, s.r) AND s.t <> s.h
GROUP BY s.h;
