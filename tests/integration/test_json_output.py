"""Stable JSON for scripts: the shapes in tests/golden/json_shapes.json, documented in docs/json.md, and the
CI job script of docs/ci.md, executed as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "json_shapes.json").read_text())
LSN = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _ok(value, spec: str) -> bool:
    optional = spec.endswith("?")
    for t in spec.rstrip("?").split("|"):
        if (t == "null" and value is None or t == "str" and isinstance(value, str)
                or t == "int" and isinstance(value, int) and not isinstance(value, bool)
                or t == "bool" and isinstance(value, bool) or t == "list" and isinstance(value, list)
                or t == "dict" and isinstance(value, dict)
                or t == "lsn" and isinstance(value, str) and LSN.match(value)
                or t == "time" and isinstance(value, str) and TIME.match(value)
                or t == "uri" and isinstance(value, str) and value.startswith("postgresql://")):
            return True
    return optional and value is None


def _check(name: str, obj: dict) -> None:
    spec = GOLDEN[name]
    required = {k for k, v in spec.items() if not v.endswith("?")}
    assert required <= set(obj) <= set(spec), f"{name}: fields {sorted(obj)} vs golden {sorted(spec)}"
    for k, v in obj.items():
        assert _ok(v, spec[k]), f"{name}.{k} = {v!r} is not {spec[k]}"


def test_json_shapes(pg18, cli):
    p = ["-p", pg18.name, "-o", "json"]
    _check("branch create", json.loads(cli("branch", "create", "--name", "js", "--ttl", "1h", *p)[1]))
    try:
        for row in json.loads(cli("branch", "list", *p)[1]):
            _check("branch list[]", row)
        _check("branch get", json.loads(cli("branch", "get", "js", *p)[1]))
        _check("endpoint start", json.loads(cli("endpoint", "start", "js", *p)[1]))
        for row in json.loads(cli("endpoint", "list", *p)[1]):
            _check("endpoint list[]", row)
        _check("connection-string", json.loads(cli("connection-string", "js", *p)[1]))
        st = json.loads(cli("status", *p)[1])
        _check("status", st)
        for d in st["daemons"]:
            _check("status.daemons[]", d)
        for e in st["endpoints"]:
            _check("status.endpoints[]", e)
        proxy = next(d for d in st["daemons"] if d["name"] == "proxy")
        assert proxy["address"] == f"127.0.0.1:{pg18.config.proxy_port}"
    finally:
        cli("branch", "delete", "js", "--force", "-p", pg18.name)


def test_every_golden_field_is_documented():
    doc = (ROOT / "docs" / "json.md").read_text()
    for name, spec in GOLDEN.items():
        for field in spec:
            assert f"`{field}`" in doc, f"{name}.{field} is not in docs/json.md"


def test_ci_script_from_the_docs_runs(pg18, tmp_path):
    text = (ROOT / "docs" / "ci.md").read_text()
    script = text.split("```bash\n", 1)[1].split("```", 1)[0]
    (tmp_path / "ci.sh").write_text(script)
    bindir = Path(sys.executable).parent
    env = {**os.environ, "NEONCTL_PROJECT": pg18.name, "CI_JOB_ID": "42",
           "PATH": f"{bindir}:{pg18.runtime().bin_dir}:{os.environ['PATH']}"}
    assert shutil.which("neonctl", path=env["PATH"])
    proc = subprocess.run(["bash", str(tmp_path / "ci.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ci-42" not in subprocess.run([str(bindir / "neonctl"), "branch", "list", "-p", pg18.name],
                                         env=env, capture_output=True, text=True).stdout
