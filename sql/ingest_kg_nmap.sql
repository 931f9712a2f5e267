-- ingest kg: raw name -> nid of its normalised name (rejected names have no row).
SELECT n.raw, k.nid
FROM rawnames n LEFT JOIN changed c USING (raw) JOIN canon k ON k.name = coalesce(c.name, n.raw)
WHERE c.reason IS NULL
