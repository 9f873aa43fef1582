"""`autotune plan --report DIR`: Optuna's own plots of a study, as HTML files."""

from __future__ import annotations

from pathlib import Path

from autotune.errors import UserError


def write_report(study_name: str, storage: str, out_dir: Path) -> list[Path]:
    """History, parameter importances, and tokens/s against peak memory."""
    import optuna
    import optuna.visualization as vis

    try:
        import plotly.graph_objects as go
    except ImportError:
        raise UserError("--report needs plotly: pip install plotly") from None
    study = optuna.load_study(study_name=study_name, storage=storage)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"history": vis.plot_optimization_history(study, target_name="tokens/s")}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) >= 2:
        try:
            figures["importances"] = vis.plot_param_importances(study, target_name="tokens/s")
        except (RuntimeError, ValueError):  # too few distinct values to rank parameters
            pass
    points = [(t.user_attrs["figures"]["peak_memory_bytes"] / 2**30, t.value, t.number) for t in complete
              if t.user_attrs.get("figures", {}).get("peak_memory_bytes")]
    scatter = go.Figure(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="markers",
                                   text=[f"trial {p[2]}" for p in points]))
    scatter.update_layout(title="tokens/s against peak memory", xaxis_title="peak memory (GiB)", yaxis_title="tokens/s")
    figures["memory"] = scatter
    paths = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.html"
        fig.write_html(str(path), include_plotlyjs="cdn")
        paths.append(path)
    return paths
