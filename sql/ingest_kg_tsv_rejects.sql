-- ingest kg: the kinds of error DuckDB's reader logged while staging one TSV file (kg_stage.py trusts the read only
-- if every one is an encoding error or a field too many; a line with several bad fields is logged once per field).
SELECT error_type, count(*) AS errors FROM kg_rejects GROUP BY error_type
