-- ingest kg: staged rows of one file that are rejects (NUL byte, wrong column count), in file order.
SELECT ord, bad, raw FROM staged WHERE ord >> 40 = $file AND bad IN ('nul_byte', 'column_count') ORDER BY ord
