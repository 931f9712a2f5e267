-- ingest kg: the first occurrence (smallest ord = file index << 40 | line or row number) of every
-- normalised (head, relation, tail), as canon numbers, sorted by input position. Grouping on integer nids
-- instead of strings keeps the hash table small; rows with a rejected name drop out of the inner joins
-- (they are quarantined elsewhere). A DuckDB-read file's row numbers skip the lines DuckDB rejected:
-- `line_gaps` (file, gap, k) holds, per distinct gap g_j = L_j - j of its rejected lines L_1 < L_2 < ...,
-- the largest such j, so the file line of row n is n + (the k of the greatest gap below n), or n when
-- no gap is below it; the ord returned here is file index << 40 | file line.
WITH d AS (
    SELECT min(s.ord) AS ord, h.nid AS hn, r.nid AS rn, t.nid AS tn
    FROM staged s JOIN nmap h ON s.h = h.raw JOIN nmap r ON s.r = r.raw JOIN nmap t ON s.t = t.raw
    WHERE s.bad IS NULL
    GROUP BY h.nid, r.nid, t.nid
)
SELECT d.ord + coalesce(g.k, 0) AS ord, d.hn, d.rn, d.tn
FROM d ASOF LEFT JOIN line_gaps g ON g.file = d.ord >> 40 AND (d.ord & 1099511627775) > g.gap
ORDER BY ord
