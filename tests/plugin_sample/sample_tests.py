"""A user's test module: every test writes conflicting data, and each must see only the template's."""

import pytest


@pytest.mark.parametrize("n", range(4))
def test_each_test_sees_only_the_template(neon_conn, n):
    rows = neon_conn.execute("SELECT id, owner, balance FROM accounts ORDER BY id").fetchall()
    assert rows == [(1, "ada", 100), (2, "brian", 50)]
    assert neon_conn.execute("SELECT count(*) FROM audit").fetchone() == (0,)
    neon_conn.execute("INSERT INTO accounts VALUES (3, %s, %s)", (f"test{n}", n))  # would clash if shared
    neon_conn.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
    neon_conn.execute("INSERT INTO audit (note) VALUES ('wrote')")


def test_branch_attributes(neon_branch, neon_template):
    assert neon_branch.name.startswith("test-") and neon_branch.lsn == neon_template.lsn
    assert neon_branch.dsn.startswith("postgresql://") and "endpoint%3D" in neon_branch.proxy_dsn
