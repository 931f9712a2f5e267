-- ingest kg: valid staged rows with a name that normalisation rejected (too long, empty after
-- cleaning), with the reason of each end; the few bad names are the build side, so this is one cheap scan.
WITH bad AS (SELECT raw, reason FROM changed WHERE reason IS NOT NULL)
SELECT s.ord, s.h, s.r, s.t, bh.reason AS head_reason, br.reason AS relation_reason, bt.reason AS tail_reason
FROM staged s LEFT JOIN bad bh ON s.h = bh.raw LEFT JOIN bad br ON s.r = br.raw LEFT JOIN bad bt ON s.t = bt.raw
WHERE s.bad IS NULL AND (bh.reason IS NOT NULL OR br.reason IS NOT NULL OR bt.reason IS NOT NULL)
ORDER BY s.ord
