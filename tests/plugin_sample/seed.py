"""A schema step given as `module:function`: it gets a psycopg connection to the template."""


def add_audit(conn) -> None:
    conn.execute("CREATE TABLE audit (id serial PRIMARY KEY, note text)")
