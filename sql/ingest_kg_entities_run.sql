-- ingest kg: kg_entities of a domain whose only kg_triples partition is the one this run just wrote,
-- straight from the run's tables: `firsts` (its distinct triples as canon numbers) and `canon` (name,
-- simplified, id hash per number). Same rows as ingest_kg_entities.sql over the lake, but the GROUP BYs
-- run on integers and nothing is read back from Parquet.
WITH ends AS (
    SELECT nid, count(*) AS degree FROM (SELECT hn AS nid FROM firsts UNION ALL SELECT tn FROM firsts) GROUP BY nid
), aliases AS (
    SELECT f.hn AS nid, list(DISTINCT a.name ORDER BY a.name) AS aliases
    FROM firsts f JOIN canon r ON f.rn = r.nid JOIN canon a ON f.tn = a.nid
    WHERE list_contains($alias_relations, r.name) AND f.tn <> f.hn GROUP BY f.hn
)
SELECT 'e' || k.hash AS entity_id, k.name, k.simplified AS name_simplified, coalesce(x.aliases, []::VARCHAR[]) AS aliases,
       e.degree, $domain AS domain
FROM ends e JOIN canon k ON k.nid = e.nid LEFT JOIN aliases x ON x.nid = e.nid
ORDER BY entity_id
