-- ingest kg: triples kept (first occurrences) per input file, for ingest_stats.
SELECT (ord >> 40)::INTEGER AS file, count(*) AS kept FROM firsts GROUP BY ALL ORDER BY file
