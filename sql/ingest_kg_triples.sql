-- ingest kg: the rows of one input file for its kg_triples file (schemas/kg_triples.json, columns in order), in
-- file order: a plain scan of table {table}, which keeps its order (a join would not). {pos} is the row's line:
-- kg.py's `rapid_line(rowid)` for a DuckDB-read file (NULL for a skipped row), else the `pos` column (set to NULL for
-- skipped rows first). The constant columns are ENUM values (type kg_consts): the file stores them as dictionary-
-- encoded strings, as it would a VARCHAR constant, but DuckDB need not build a dictionary from every row's string.
SELECT $domain::kg_consts AS domain, $partition::kg_consts AS partition, h AS head, r AS relation, t AS tail,
       $source::kg_consts AS source_file, source_pos
FROM (SELECT h, r, t, {pos} AS source_pos FROM {table})
WHERE source_pos IS NOT NULL
