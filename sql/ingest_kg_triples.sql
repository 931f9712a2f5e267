-- ingest kg: the rows of one input file for its kg_triples file (schemas/kg_triples.json, columns in order), in
-- file order: a plain scan of the file's staging table, which keeps its order (a join would not). The WHERE clause
-- drops the rows in `skip` (a bit test against the file's skip bitstring), and source_pos is the row's line (the
-- `pos` column of a Python-read file, a DuckDB-read file's line map as a SQL expression over rowid); kg.py fills
-- in both, and puts a Python function in either place for a file too long or too ragged for the SQL. The constant
-- columns are ENUM values (type kg_consts): the file stores them as dictionary-encoded strings, as it would a
-- VARCHAR constant, but DuckDB need not build a dictionary from every row's string.
SELECT $domain::kg_consts AS domain, $partition::kg_consts AS partition, h AS head, r AS relation, t AS tail,
       $source::kg_consts AS source_file, {pos} AS source_pos
FROM {table}
WHERE {keep}
