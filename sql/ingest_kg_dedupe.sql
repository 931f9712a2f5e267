-- ingest kg: keep the first occurrence (input file order, then line) of every (head, relation, tail).
-- `staged` holds this run's raw rows (ord = file index << 40 | line); `names` maps each distinct raw
-- name to its normalised name / simplified form / id hash, or a reject reason (those rows are
-- quarantined elsewhere). Ids are 1:1 with normalised names, so any_value of a name within a group
-- is exact. One join + one GROUP BY; both spill to disk at any scale.
WITH valid AS (
    SELECT h.hash AS hh, r.hash AS rh, t.hash AS th, h.name AS head, r.name AS relation, t.name AS tail,
           h.simplified AS head_simplified, t.simplified AS tail_simplified, s.ord
    FROM staged s JOIN names h ON s.h = h.raw JOIN names r ON s.r = r.raw JOIN names t ON s.t = t.raw
    WHERE h.reason IS NULL AND r.reason IS NULL AND t.reason IS NULL
), firsts AS (
    SELECT hh, rh, th, min(ord) AS ord, any_value(head) AS head, any_value(relation) AS relation, any_value(tail) AS tail,
           any_value(head_simplified) AS head_simplified, any_value(tail_simplified) AS tail_simplified
    FROM valid GROUP BY hh, rh, th
)
SELECT $domain AS domain, $partition AS partition, 'e' || hh AS head_id, 'r' || rh AS relation_id, 'e' || th AS tail_id,
       head, relation, tail, head_simplified, tail_simplified, src.source_file, ord & 1099511627775 AS source_pos
FROM firsts JOIN sources src ON src.file_idx = (ord >> 40)
ORDER BY ord
