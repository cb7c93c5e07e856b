"""The README's first command: `neonctl quickstart` on an empty home ends with a working connection string."""

import os
import subprocess
import sys

import psycopg


def test_quickstart_from_empty_home(tmp_path):
    env = {**os.environ, "NEONCTL_HOME": str(tmp_path / "home")}
    try:
        proc = subprocess.run([sys.executable, "-m", "neonctl", "quickstart"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        cs = proc.stdout.strip().splitlines()[-1]
        assert cs.startswith("postgresql://")
        with psycopg.connect(cs) as conn:
            assert conn.execute("SELECT count(*) FROM quickstart").fetchone()[0] == 1
        again = subprocess.run([sys.executable, "-m", "neonctl", "quickstart", "-o", "json"], env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        assert '"rows_in_quickstart_table": 2' in again.stdout  # same project, data kept
    finally:
        subprocess.run([sys.executable, "-m", "neonctl", "project", "delete", "demo"], env=env, capture_output=True,
                       timeout=120)
