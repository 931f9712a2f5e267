-- ingest kg: what DuckDB made of one staged TSV file (rows it emitted, by kind) and of the lines it
-- rejected; kg.py reconciles emitted + rejected lines against the file's line count before trusting it.
SELECT (SELECT count(*) FROM staged WHERE ord >> 40 = $file) AS emitted,
       (SELECT count(*) FROM staged WHERE ord >> 40 = $file AND bad IS NULL) AS valid,
       (SELECT count(DISTINCT line) FROM kg_rejects) AS rejected_lines,
       (SELECT count(*) FROM kg_rejects WHERE error_type <> 'INVALID ENCODING') AS other_errors
