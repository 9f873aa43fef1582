"""A study after the fact: its trials as rows (`autotune trials`) and Optuna's plots as HTML
files that work offline (`autotune report`, `autotune plan --report DIR`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from autotune.errors import UserError, first_line
from autotune.plan import ACCUMULATION

DEFAULT_STORAGE = "sqlite:///plans/studies.db"


def load_study(storage: str | None, study: str | None) -> Any:
    """The study named ``study`` in ``storage`` (None: the only one there); every problem
    (no such file, a bad URL, an unknown or ambiguous name) is a one-line UserError."""
    import optuna

    from autotune.planning.study import make_storage

    url = storage or DEFAULT_STORAGE
    opened = make_storage(url, existing=True)  # a SQLite file that is not Optuna's is left alone
    try:
        names = [s.study_name for s in opened.get_all_studies()]
    except Exception as e:  # SQLAlchemy's and Optuna's errors for a bad URL are many and long
        raise UserError(f"--storage {url}: {first_line(e)[:200]}") from None
    if study is None:
        if len(names) != 1:
            raise UserError(
                f"{url} holds {len(names)} studies; name one with --study ({', '.join(sorted(names)) or 'none'})"
            )
        study = names[0]
    elif study not in names:
        raise UserError(f"no study {study!r} in {url} (it holds: {', '.join(sorted(names)) or 'none'})")
    return optuna.load_study(study_name=study, storage=opened)


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, role, status, tokens/s, peak memory, micro-batch,
    accumulation and processes, strategies with their knobs, and the whole error line."""
    from autotune.planning.summary import INTERRUPTED, interrupted

    rows = []
    for t in study.get_trials(deepcopy=False):
        killed = interrupted(t)  # failed by the next planner on the study: no status of its own
        plan = t.user_attrs.get("plan") or {}
        figures = t.user_attrs.get("figures") or {}
        strategies = plan.get("strategies", [])
        accum = next((s["knobs"].get("steps", 1) for s in strategies if s["name"] == ACCUMULATION), 1)
        launch = plan.get("launch", {})
        rows.append(
            {
                "number": t.number,
                "role": t.user_attrs.get("role", "search"),
                "status": "interrupted" if killed else t.user_attrs.get("status", t.state.name.lower()),
                "tokens_per_s": t.value if t.state.name == "COMPLETE" else None,
                "peak_memory_bytes": figures.get("peak_memory_bytes"),
                "micro_batch_size": plan.get("train", {}).get("micro_batch_size"),
                "grad_accum": accum,  # the column `autotune trials` prints, not the strategy's name
                "processes": launch.get("nproc_per_node", 1) * launch.get("nnodes", 1),
                "strategies": {s["name"]: s.get("knobs", {}) for s in strategies},
                "error": INTERRUPTED if killed else t.user_attrs.get("error"),
            }
        )
    return rows


def write_report(study_name: str, storage: str, out_dir: Path) -> list[Path]:
    """History, parameter importances, and tokens/s against peak memory, each an HTML file
    with plotly inlined (training clusters are often offline: no CDN)."""
    import optuna
    import optuna.visualization as vis

    try:
        import plotly.graph_objects as go
    except ImportError:
        raise UserError("--report needs plotly: pip install plotly") from None
    study = load_study(storage, study_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"history": vis.plot_optimization_history(study, target_name="tokens/s")}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) >= 2:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figures["importances"] = vis.plot_param_importances(study, target_name="tokens/s")
        except (RuntimeError, ValueError):  # too few distinct values to rank parameters
            pass
    points = [
        (t.user_attrs["figures"]["peak_memory_bytes"] / 2**30, t.value, t.number)
        for t in complete
        if t.user_attrs.get("figures", {}).get("peak_memory_bytes")
    ]
    scatter = go.Figure(
        go.Scatter(
            x=[p[0] for p in points], y=[p[1] for p in points], mode="markers", text=[f"trial {p[2]}" for p in points]
        )
    )
    scatter.update_layout(title="tokens/s against peak memory", xaxis_title="peak memory (GiB)", yaxis_title="tokens/s")
    figures["memory"] = scatter
    paths = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.html"
        try:
            fig.write_html(str(path), include_plotlyjs=True)
        except OSError as e:
            raise UserError(f"--out {out_dir}: cannot write {path.name}: {e.strerror}") from None
        paths.append(path)
    return paths
