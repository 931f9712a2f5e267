-- ingest kg: keep the first occurrence (input file order, then line) of every (head, relation, tail).
-- `staged` is a view over this run's staged Parquet (ids already computed once per distinct name);
-- GROUP BY + semi-join spill to disk at any scale.
WITH firsts AS (
    SELECT min(ord) AS ord FROM staged GROUP BY head_id, relation_id, tail_id
)
SELECT $domain AS domain, $partition AS partition, head_id, relation_id, tail_id, head, relation, tail,
       head_simplified, tail_simplified, source_file, source_pos
FROM staged SEMI JOIN firsts USING (ord)
ORDER BY ord
