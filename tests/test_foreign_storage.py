"""A SQLite file that is not an Optuna storage, given where a study is read (compare, trials,
report, --warm-start) or made (plan --storage), is refused with one line and left as it was:
opening it as a storage would write Optuna's tables into someone else's database."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from autotune.errors import UserError
from autotune.planning.study import make_storage
from tests.conftest import ROOT


@pytest.fixture
def foreign(tmp_path):
    """Someone's own SQLite database, and how to tell it was not touched: its bytes and mtime."""
    path = tmp_path / "notes.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.execute("INSERT INTO notes (text) VALUES ('mine')")
    db.close()
    os.utime(path, ns=(10**18, 10**18))
    return path, path.read_bytes()


def untouched(path, before: bytes) -> bool:
    alone = sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no journal, no report
    return alone and path.read_bytes() == before and path.stat().st_mtime_ns == 10**18


@pytest.mark.parametrize(
    "args",
    [
        ["trials", "--storage", "{url}"],
        ["report", "--storage", "{url}", "--out", "{dir}/report"],
    ],  # compare: tests/test_hostile.py
)
def test_a_command_reading_a_study_leaves_a_foreign_sqlite_file_alone(foreign, args):
    path, before = foreign
    argv = [a.format(url=f"sqlite:///{path}", dir=path.parent) for a in args]
    r = subprocess.run([sys.executable, "-m", "autotune", *argv], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "not an Optuna storage" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert untouched(path, before)


@pytest.mark.parametrize("existing", [True, False])  # --warm-start's reading; plan --storage's study
def test_the_storage_of_a_search_is_never_a_foreign_sqlite_file(foreign, existing):
    path, before = foreign
    with pytest.raises(UserError, match="not an Optuna storage"):
        make_storage(f"sqlite:///{path}", existing=existing)
    assert untouched(path, before)
    (path.parent / "text.db").write_text("not a database at all")
    with pytest.raises(UserError, match="is not a SQLite database"):
        make_storage(f"sqlite:///{path.parent / 'text.db'}", existing=existing)


def test_a_study_is_read_from_what_optuna_wrote_and_made_in_a_new_or_empty_file(tmp_path):
    import optuna

    made = tmp_path / "new.db"
    optuna.create_study(study_name="s", storage=make_storage(f"sqlite:///{made}"))  # a new file
    assert [s.study_name for s in make_storage(f"sqlite:///{made}", existing=True).get_all_studies()] == ["s"]
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(UserError, match="holds no study"):  # nothing to read, and nothing written
        make_storage(f"sqlite:///{empty}", existing=True)
    assert empty.stat().st_size == 0
    make_storage(f"sqlite:///{empty}")  # a planner may make its study there
    with pytest.raises(UserError, match="no such database file"):
        make_storage(f"sqlite:///{tmp_path / 'missing.db'}", existing=True)
    assert not (tmp_path / "missing.db").exists()
