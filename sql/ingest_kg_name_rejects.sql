-- ingest kg: data rows (not already in `skip`) with a name that normalisation rejected (too long, empty after
-- cleaning), with the reason of each end, in input order. The WHERE clause of `hit` (from kg.py) tests the three
-- names against the few rejected ones (a constant list when there are few, else a semi-join): one scan of `staged`.
WITH bad AS (SELECT raw, reason FROM changed WHERE reason IS NOT NULL),
hit AS (SELECT f, rid, pos, h, r, t FROM staged WHERE {hit})
SELECT s.f, s.rid, s.pos, s.h, s.r, s.t, bh.reason AS head_reason, br.reason AS relation_reason, bt.reason AS tail_reason
FROM hit s LEFT JOIN bad bh ON s.h = bh.raw LEFT JOIN bad br ON s.r = br.raw LEFT JOIN bad bt ON s.t = bt.raw
WHERE NOT EXISTS (SELECT 1 FROM skip k WHERE k.f = s.f AND k.rid = s.rid)
ORDER BY s.f, s.rid
