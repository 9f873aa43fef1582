"""A throwaway PostgreSQL cluster for the tests: Debian's postgresql package, initdb into a
temporary folder, a server on 127.0.0.1 at a free port, stopped (fast) at the end.

`.ci/run` installs the package on a clean machine and sets AUTOTUNE_REQUIRE_POSTGRES=1, so
there a missing server fails the tests instead of skipping them. Run as root (CI, the dev
containers), the cluster belongs to the package's ``postgres`` user: PostgreSQL refuses to
run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REQUIRED = os.environ.get("AUTOTUNE_REQUIRE_POSTGRES") == "1"


def _bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, else in Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(why: str) -> None:
    if REQUIRED:
        pytest.fail(f"PostgreSQL is required here (AUTOTUNE_REQUIRE_POSTGRES=1): {why}")
    pytest.skip(f"no PostgreSQL server: {why}")


@contextmanager
def cluster() -> Iterator[str]:
    """Start a cluster in a fresh temporary folder (outside pytest's, which only root may
    enter); yields the SQLAlchemy URL of its database ``autotune``; removes it all after."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        _unavailable("initdb/pg_ctl not found (Debian: apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401  (SQLAlchemy 2.1's postgresql:// driver)
    except ImportError:
        _unavailable('psycopg is not installed (pip install "psycopg[binary]")')
    as_user: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            runuser = None
        if runuser is None:
            _unavailable("running as root without a postgres user (PostgreSQL refuses root)")
        as_user = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="autotune-pg-"))
    data, sockets = root / "pgdata", root / "pgsock"
    sockets.mkdir()
    if as_user:
        os.chmod(root, 0o755)
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    run(initdb, "-D", str(data), "-U", "autotune", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c "
        f"unix_socket_directories={sockets} -c fsync=off -c max_connections=50"
    )
    run(pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "-t", "60", "start")
    try:
        url = f"postgresql://autotune@127.0.0.1:{port}/autotune"
        for _ in range(50):
            try:
                run(_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "autotune", "autotune")
                break
            except subprocess.CalledProcessError:
                time.sleep(0.2)
        yield url
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
