"""CI's short bounded fuzz pass: every target, its seed corpus first, then a few thousand coverage-guided
inputs (seconds). A finding, an fd leak or a logged exception fails the run. Long runs:
`python -m tests.fuzz.run --target NAME --runs 1000000` (docs/robustness.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import targets

REPO = Path(__file__).resolve().parents[2]
RUNS = 3000


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_short_fuzz_pass(name):
    res = subprocess.run([sys.executable, "-m", "tests.fuzz.run", "--target", name, "--runs", str(RUNS)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    # atheris prints the finding's traceback on stdout and libFuzzer's verdict on stderr: show both
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summaries = [json.loads(line.split(" ", 1)[1]) for line in res.stderr.splitlines()
                 if line.startswith("fuzz-summary ")]
    assert summaries and summaries[-1]["inputs"] == RUNS, res.stderr[-3000:]
    assert summaries[-1]["fds"] == summaries[0]["fds"], summaries


def test_seed_corpora_exist_and_are_small():
    for name in targets.TARGETS:
        files = list((REPO / "tests" / "fuzz" / "corpus" / name).iterdir())
        assert files and sum(f.stat().st_size for f in files) < 256 * 1024, name
