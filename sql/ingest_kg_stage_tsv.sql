-- ingest kg: stage one plain TSV file into its table s<i> with DuckDB's own parallel reader (kg_readers.tsv_layout
-- proved it safe; rapid_pipeline/ingest/kg_stage.py explains the rest). One row per line, in file order, except the
-- lines DuckDB rejects (invalid UTF-8, two fields too many or more: table kg_rejects, with their line) and blank
-- lines. The columns are c0..c<width>, one more than a line should have, so a line with one field too many still
-- gives a row; missing fields are NULL (null_padding) and, as the NULL string $nul is a NUL byte, an empty field is
-- ''. `bad` flags the rows that are not clean data: a missing field, the extra field, or (only checked when the file
-- holds one, $check_nul) a NUL byte; `raw` is such a row's line again (its fields joined by tabs; exact unless the
-- file holds a NUL byte, and then kg_stage.py reads the line from the file instead). `k` is the triple's 64-bit hash
-- for the dedupe (computed here, in the parallel read, once).
CREATE TABLE {table} AS
SELECT h, r, t, hash(h, r, t) AS k, bad, CASE WHEN bad THEN concat_ws(chr(9), {fields}) END AS raw
FROM (
    SELECT {h} AS h, {r} AS r, {t} AS t, {bad} AS bad, {fields}
    FROM read_csv($path, columns = {{{columns}}}, delim = chr(9), quote = '', escape = '', comment = '', header = false,
                  auto_detect = false, strict_mode = true, null_padding = true, nullstr = $nul, new_line = '\n',
                  store_rejects = true, rejects_table = 'kg_rejects', rejects_scan = 'kg_reject_scans')
)
