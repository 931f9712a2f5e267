-- ingest kg: stage one plain TSV file through DuckDB's own CSV reader (kg_readers.tsv_layout proved it
-- safe). Each line is one VARCHAR row: the delimiter \x01 does not occur in the file and quoting and
-- comments are off, so blank lines stay rows (NULL) and row_number() OVER () — which keeps file order —
-- numbers every line DuckDB did not reject. Rejected lines (invalid UTF-8) go to table kg_rejects with
-- their line number; kg.py maps row numbers back to file lines. `bad` marks rows that are not data
-- (header, blank) or are rejects (NUL byte, wrong column count: `raw` keeps their line).
INSERT INTO staged
SELECT f[$h] AS h, f[$r] AS r, f[$t] AS t, ($file::BIGINT << 40) | rn AS ord, bad,
       CASE WHEN bad IN ('nul_byte', 'column_count') THEN line END AS raw
FROM (
    SELECT rn, line, f,
           CASE WHEN rn = 1 AND $skip_first THEN 'header' WHEN line IS NULL THEN 'blank'
                WHEN contains(line, chr(0)) THEN 'nul_byte' WHEN len(f) <> $width THEN 'column_count' END AS bad
    FROM (
        SELECT row_number() OVER () AS rn, line, string_split(line, chr(9)) AS f
        FROM read_csv($path, columns = {'line': 'VARCHAR'}, delim = chr(1), quote = '', escape = '', comment = '',
                      header = false, auto_detect = false, strict_mode = true, new_line = '\n', all_varchar = true,
                      store_rejects = true, rejects_table = 'kg_rejects', rejects_scan = 'kg_reject_scans')
    )
)
