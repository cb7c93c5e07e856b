"""A failing test, for --neonctl-keep-failed."""


def test_fails_after_writing(neon_conn):
    neon_conn.execute("INSERT INTO accounts VALUES (99, 'state at failure', 0)")
    raise AssertionError("deliberate failure")
