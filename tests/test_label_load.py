"""A smaller run of benchmarks/label_load.py: 8 labelers × 10 tasks at once against the real server on
loopback, on SQLite and PostgreSQL — every submission stored exactly once, double submissions refused."""
import importlib.util

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("label_load", ROOT / "benchmarks" / "label_load.py")
label_load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(label_load)


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_concurrent_labelers_lose_and_duplicate_nothing(db, request):
    pg = request.getfixturevalue("pg_url") if db == "postgresql" else None
    r = label_load.run(db, labelers=8, tasks=10, overlap=2, pg_url=pg, deadline_s=240)
    assert r["problems"] == []
    assert r["submissions"] == 80 and r["duplicates_refused"] == 16
    assert r["submit"]["n"] == 80
