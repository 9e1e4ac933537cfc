"""The parallel set-up `make test` relies on: pytest-xdist keeps an `xdist_group` together."""

from __future__ import annotations

import re
import subprocess
import sys


def test_loadgroup_runs_a_group_on_one_worker_and_spreads_the_rest(tmp_path):
    # two modules share a group (as test_cli_verbs and test_mlflow_review share the demo run)
    grouped = 'import pytest\npytestmark = pytest.mark.xdist_group("shared")\n'
    (tmp_path / "test_a.py").write_text(grouped + "def test_a1(): pass\ndef test_a2(): pass\n")
    (tmp_path / "test_b.py").write_text(grouped + "def test_b1(): pass\ndef test_b2(): pass\n")
    (tmp_path / "test_c.py").write_text("".join(f"def test_c{i}(): pass\n" for i in range(6)))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p",
         "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:]
    workers = {m[2]: m[1] for m in re.finditer(r"\[(gw\d)\].*PASSED \S*::(test_\w+)", out.stdout)}
    assert len(workers) == 10, out.stdout[-2000:]
    # pytest 9.2 + pytest-xdist 3.8 spread these over both workers (see pyproject's pin)
    assert len({workers[t] for t in ("test_a1", "test_a2", "test_b1", "test_b2")}) == 1, workers
    assert len(set(workers.values())) == 2, workers  # the rest is spread
