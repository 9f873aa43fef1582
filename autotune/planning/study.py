"""The study: Optuna storage (SQLite by default, or a database server shared by several
machines) with heartbeats, so a planner killed mid-search resumes with the same command and the
trial it was running is marked failed; what a study's figures are measured under (its
identity); the planner runs that measured it; and the lock planners sharing it take."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import re
import sqlite3
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna

from autotune.errors import UserError, first_line
from autotune.planning.objective import ThroughputPruner
from autotune.runtime import trial as trialmod
from autotune.runtime.trial import TrialBudget

HEARTBEAT_S = 2
GRACE_S = 8
"""A trial whose heartbeat is this old belongs to a dead planner: the next trial started on
the study (by any planner) marks it failed."""


MAX_RETRY = 2
"""An interrupted trial is run again this many times at most (a trial that itself brings
its planner down must not be retried forever)."""
CONNECT_TIMEOUT_S = 10
"""Seconds a database server may take to answer a connection."""
SCHEMA_RACE_RETRIES = 3
"""Tries again when another machine was creating Optuna's tables in the same new database."""


def make_storage(url: str, *, existing: bool = False) -> optuna.storages.BaseStorage:
    """The study's database, with heartbeats: a trial whose planner died (heartbeat older
    than GRACE_S) is marked FAIL by the next planner on the study, and run again with the
    same parameters (RetryHeartbeatStaleTrialCallback). A URL that cannot be used is one line.
    ``existing``: studies are read from it, not made (compare, --warm-start, trials), so a
    SQLite file must be there already."""
    _check_sqlite(url, existing)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith(("postgresql", "mysql")):  # a server that does not answer: fail in seconds
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
        except Exception as e:  # SQLAlchemy's URL, dialect, driver and connection errors
            # Machines that open a new database together race to create Optuna's tables: the
            # loser's CREATE fails on what the winner made; a moment later the tables are there.
            if attempt < SCHEMA_RACE_RETRIES and any(m in str(e) for m in ("duplicate key", "already exists")):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise UserError(f"storage URL {url}: cannot connect: {first_line(e)}") from None
    raise AssertionError("unreachable")


def _check_sqlite(url: str, existing: bool) -> None:
    """Refuse a SQLite file that is there but is not an Optuna storage (``existing``: or is
    not there, or is empty): opening it as one writes Optuna's tables into it. It is read
    read-only, so its bytes and times stay as they are."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url.removeprefix("sqlite:///"))
    if not path.is_file():
        if existing:
            raise UserError(f"storage URL {url}: no such database file {path}")
        return
    if path.stat().st_size == 0:  # a new database, until Optuna makes its tables
        if existing:
            raise UserError(f"storage URL {url}: {path} is empty: it holds no study")
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as e:
        raise UserError(f"storage URL {url}: {path} is not a SQLite database ({first_line(e)})") from None
    if not {"studies", "version_info"} <= tables:
        raise UserError(
            f"storage URL {url}: {path} is a SQLite database but not an Optuna storage "
            "(no studies table); left as it is"
        )


def trial_log_dir(storage_url: str, study_name: str) -> Path:
    """Where a study's trial logs are kept: ``trials/<study>`` beside a SQLite database,
    else under the cache (``$AUTOTUNE_CACHE`` or ~/.cache/autotune)."""
    safe = study_name.replace("/", "_").replace(":", "_")
    prefix = "sqlite:///"
    if storage_url.startswith(prefix) and storage_url[len(prefix) :] not in ("", ":memory:"):
        return Path(storage_url[len(prefix) :]).expanduser().parent / "trials" / safe
    return trialmod.cache_root() / "trials" / safe


SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed, n_startup_trials=4),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "qmc": lambda seed: optuna.samplers.QMCSampler(seed=seed),
}


def open_study(
    name: str,
    storage: str,
    sampler: str,
    seed: int,
    *,
    identity: dict[str, str] | None = None,
    choices: dict[str, list[Any]] | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create or load the study. ``identity`` (:func:`study_identity`) is what its figures are
    measured under: recorded by the first planner, and a later one under other settings is
    refused, since its figures would not compare with the study's. ``choices``
    (``space.categorical_choices``): what this search offers; a study searched among other
    choices is refused (:func:`check_choices`)."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    study = optuna.create_study(
        study_name=name,
        storage=make_storage(storage),
        sampler=SAMPLERS[sampler](seed),
        pruner=pruner if pruner is not None else ThroughputPruner(),
        direction="maximize",
        load_if_exists=True,
    )
    if identity is not None:
        check_identity(study, identity)
    if choices is not None:
        check_choices(study, choices)
    return study


def study_identity(budget: TrialBudget, global_batch: int | None) -> dict[str, str]:
    """What a study's figures depend on besides the plan: the trial budget, the versions and
    the global batch."""
    import torch

    import autotune

    return {
        "warmup_steps": str(budget.warmup_steps),
        "timed_steps": str(budget.timed_steps),
        "torch": torch.__version__,
        "autotune": autotune.__version__,
        "global_batch": "searched" if global_batch is None else str(global_batch),
    }


def check_identity(study: optuna.Study, identity: dict[str, str]) -> None:
    """Record ``identity`` on a study that has none; refuse one that differs, naming each
    difference."""
    recorded = study.user_attrs.get("identity")
    if recorded is None:
        study.set_user_attr("identity", dict(identity))
        return
    differ = [
        f"{k} {recorded.get(k, 'unset')} (now {identity.get(k, 'unset')})"
        for k in sorted(set(recorded) | set(identity))
        if recorded.get(k) != identity.get(k)
    ]
    if differ:
        raise UserError(
            f"study {study.study_name} was measured under {', '.join(differ)}: "
            "use another --study, or the same settings"
        )


def check_choices(study: optuna.Study, choices: dict[str, list[Any]]) -> None:
    """Refuse a study whose trials chose a categorical parameter among other choices than
    ``choices`` (name -> choices offered here), naming each difference: an extra installed or
    removed since (``triton_kernels.loss`` offers liger and cce where their packages are), or
    another device. Optuna cannot sample such a parameter again (its categorical distributions
    have no dynamic value space: the search would stop at its first trial), and the study's
    figures were searched in another space."""
    recorded: dict[str, tuple[Any, ...]] = {}
    for t in study.get_trials(deepcopy=False):
        for name, dist in t.distributions.items():
            if name in choices and isinstance(dist, optuna.distributions.CategoricalDistribution):
                recorded.setdefault(name, tuple(dist.choices))
    differ = [
        f"{name} among {_listed(old)} (here {_listed(choices[name])})"
        for name, old in sorted(recorded.items())
        if old != tuple(choices[name])
    ]
    if differ:
        raise UserError(
            f"study {study.study_name} searched {'; '.join(differ)}: an extra package or the device differs "
            f"from its trials'; use another --study (--warm-start STORAGE#{study.study_name} starts from its best)"
        )


def _listed(choices: Any) -> str:
    return "[" + ", ".join(map(str, choices)) + "]"


def stale_runs(study: optuna.Study, run: str, since: datetime.datetime) -> set[str]:
    """The planner runs other than ``run`` that ended before ``run`` began at ``since`` (a
    killed planner's, resumed now): none of their trials is running or started since. Their
    figures saw another load, so they are not compared with this run's unless measured again.
    Planners running beside this one on a shared study start trials after ``since``: not stale."""
    runs, alive = set(), {run}
    for t in study.get_trials(deepcopy=False):
        r = t.user_attrs.get("run")
        if r is None:
            continue
        runs.add(r)
        if t.state == optuna.trial.TrialState.RUNNING or (t.datetime_start is not None and t.datetime_start >= since):
            alive.add(r)
    return runs - alive


def stale(trial: optuna.trial.FrozenTrial, earlier: set[str]) -> bool:
    """Whether completed ``trial`` was measured by one of the ``earlier`` runs
    (:func:`stale_runs`), or by an autotune that recorded no run (before runs were)."""
    r = trial.user_attrs.get("run")
    return r is None or r in earlier


@contextlib.contextmanager
def study_lock(study: optuna.Study) -> Iterator[None]:
    """A lock held in the study's database server for the block, on its own connection (the
    storage's other connections go on): PostgreSQL's advisory lock, MySQL's GET_LOCK. Nothing
    on SQLite, whose planners share one machine and so its device lock (trial.measuring), or
    in memory."""
    storage = getattr(study._storage, "_backend", study._storage)  # optuna's cache wraps the RDB storage
    engine = getattr(storage, "engine", None)
    if engine is None or engine.dialect.name not in ("postgresql", "mysql"):
        yield
        return
    import sqlalchemy

    key = zlib.crc32(f"autotune:{study.study_name}".encode())
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        else:
            conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, 60)"), {"k": f"autotune-{key}"})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": f"autotune-{key}"})


def wait_for_others(
    study: optuna.Study, limit_s: float, *, poll_s: float = 2.0, log: Callable[[str], None] | None = None
) -> None:
    """Wait, at most ``limit_s``, for the trials other planners on this study still run, so
    that every planner of a shared search summarizes the same trials (and writes the same
    plan). A trial whose planner died is failed by its stale heartbeat on the way."""
    deadline = time.monotonic() + max(0.0, limit_s)
    said = False
    while True:
        optuna.storages.fail_stale_trials(study)
        running = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
        if not running or time.monotonic() >= deadline:
            return
        if log is not None and not said:
            log(f"waiting for {len(running)} trial(s) other planners on study {study.study_name} are running")
            said = True
        time.sleep(poll_s)


def study_name(
    workload: str, fingerprint: str, global_batch: int | None = None, overrides: dict[str, Any] | None = None
) -> str:
    """``workload-fingerprint``; a global batch other than the recipe's (``global_batch``, 0
    for a searched one) is another recipe, so another study: ``workload-gbN-fingerprint``;
    the workload's settings (an hf: config) another model: ``workload-cHASH-fingerprint``."""
    recipe = "" if global_batch is None else f"-gb{global_batch or 'free'}"
    if overrides:
        recipe += "-c" + hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{workload}{recipe}-{fingerprint}")
