-- ingest kg: the first occurrence (smallest ord = file index << 40 | line or row number) of every
-- normalised (head, relation, tail). Grouping on integer nids instead of strings keeps the hash table
-- small; rows with a rejected name drop out of the inner joins (they are quarantined elsewhere).
SELECT min(s.ord) AS ord, h.nid AS hn, r.nid AS rn, t.nid AS tn
FROM staged s JOIN nmap h ON s.h = h.raw JOIN nmap r ON s.r = r.raw JOIN nmap t ON s.t = t.raw
WHERE s.bad IS NULL
GROUP BY h.nid, r.nid, t.nid
