-- ingest kg: lines DuckDB rejected while staging one TSV file (one row per line; a line with several
-- bad fields has several reject rows), in file order.
SELECT DISTINCT line FROM kg_rejects ORDER BY line
