-- ingest kg: one row per distinct normalised name of this run. `changed` holds only the raw names
-- Python normalised to something else (or rejected); every other raw name is its own normal form.
-- nid numbers the names 0.. for this session only (it never leaves it: ids are the sha256 hash).
WITH mapped AS (
    SELECT coalesce(c.name, n.raw) AS name, coalesce(c.simplified, n.raw) AS simplified
    FROM rawnames n LEFT JOIN changed c USING (raw) WHERE c.reason IS NULL
)
SELECT name, any_value(simplified) AS simplified, substr(sha256($prefix || name), 1, 15) AS hash,
       row_number() OVER () - 1 AS nid
FROM mapped GROUP BY name
