-- PostgreSQL built-in functions whose arguments name relations or carry query text, from pg_proc:
-- regclass arguments name a relation (whose contents are read when the function is described
-- as mapping "contents", else only its metadata: size, structure, sequence state), refcursor arguments a cursor, text arguments named
-- "query" carry a query, name arguments named "schema" a schema; functions described as
-- mapping "database" contents read every table. Output: proname, argument position (0: none),
-- argument name (- if unnamed), class. pg15_relation_functions.txt is its output on
-- PostgreSQL 15; a test compares the two on the test cluster.
SELECT DISTINCT p.proname, a.n, coalesce(nullif(p.proargnames[a.n], ''), '-'),
       CASE WHEN a.t = 'regclass'::regtype
                 AND obj_description(p.oid, 'pg_proc') LIKE '%contents%' THEN 'relation'
            WHEN a.t = 'regclass'::regtype THEN 'relation_metadata'
            WHEN a.t = 'refcursor'::regtype THEN 'cursor'
            WHEN a.t = 'text'::regtype THEN 'query'
            ELSE 'schema' END
  FROM pg_proc p, unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(t, n)
 WHERE p.pronamespace = 'pg_catalog'::regnamespace
   AND (a.t IN ('regclass'::regtype, 'refcursor'::regtype)
        OR (a.t = 'text'::regtype AND p.proargnames[a.n] = 'query')
        OR (a.t = 'name'::regtype AND p.proargnames[a.n] = 'schema'))
UNION
SELECT p.proname, 0, '-', 'database'
  FROM pg_proc p
 WHERE p.pronamespace = 'pg_catalog'::regnamespace
   AND obj_description(p.oid, 'pg_proc') LIKE 'map database %'
 ORDER BY 1, 2
