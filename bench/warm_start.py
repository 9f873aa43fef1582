"""Warm start against a cold search: trials and wall time to reach 97% of the best.

Runs the same search twice on fresh studies (same seed, sampler and trial count): once cold
(baseline, expert priors, then TPE), once with ``--warm-start`` sources enqueued after the
baseline, each with a fresh compile cache. The search only, as ``autotune plan`` runs it (no
confirmation). Each trial's
tokens/s, the best so far and the wall time since the search started are recorded, one JSON
line per search, then a summary line.

    python3 bench/warm_start.py --workload tiny --cpu-procs 2 --trials 6 \\
        --warm-start sqlite:///bench/results/cpu-procs/studies-2procs.db --out bench/results/warm-start/cpu.jsonl
    # on one H200 (bench/README.md has the figures):
    python3 bench/warm_start.py --workload gpt2-124m --trials 4 \\
        --warm-start sqlite:///bench/results/plan-phase8-small/studies.db --out bench/results/warm-start/h200.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autotune.limits import usable_cores  # noqa: E402
from autotune.planning.first_trials import (  # noqa: E402
    ensure_first_trials,
    expert_priors,  # noqa: E402
    warm_starts,
)
from autotune.planning.objective import Objective, optimize  # noqa: E402
from autotune.planning.settings import PlanSettings, load_profile  # noqa: E402
from autotune.planning.space import build_space  # noqa: E402
from autotune.planning.study import open_study  # noqa: E402
from autotune.runtime.trial import TrialBudget  # noqa: E402
from autotune.workloads import load_workload  # noqa: E402

TARGET = 0.97


def run_search(settings: PlanSettings, storage: str, name: str, warm: bool) -> dict:
    """One fresh search; its trials in order with the best so far and the wall since its start."""
    profile = load_profile(settings)
    workload = load_workload(settings.workload)
    space, _ = build_space(settings, profile, workload)
    if not space.train.random_tokens:
        from autotune import data

        data.default_dataset(workload.vocab_size)
    starts = warm_starts(space, settings.warm_start, print) if warm else []
    study = open_study(name, storage, settings.sampler, settings.seed)
    ensure_first_trials(study, space, expert_priors(space), starts)
    objective = Objective(space=space, budget=settings.budget)
    began = time.time()
    optimize(study, objective, trials=settings.trials, time_budget=None)
    rows, best = [], None
    for t in study.get_trials(deepcopy=False):
        if t.datetime_complete is None:
            continue
        if t.value is not None:
            best = t.value if best is None else max(best, t.value)
        rows.append(
            {
                "number": t.number,
                "role": t.user_attrs.get("role", "search"),
                "source": t.user_attrs.get("source"),
                "status": t.user_attrs.get("status", t.state.name.lower()),
                "tokens_per_s": t.value,
                "best_so_far": best,
                "wall_s": round(t.datetime_complete.timestamp() - began, 1),
            }
        )
    return {
        "search": "warm" if warm else "cold",
        "warm_start": settings.warm_start if warm else [],
        "trials": rows,
        "best": best,
        "wall_s": round(time.time() - began, 1),
    }


def reached(result: dict, target: float) -> dict:
    """The first trial (count of trials run, wall) whose best so far is at least ``target``."""
    for k, row in enumerate(result["trials"], 1):
        if row["best_so_far"] is not None and row["best_so_far"] >= target:
            return {"trials_to_target": k, "wall_to_target_s": row["wall_s"]}
    return {"trials_to_target": None, "wall_to_target_s": None}


def summarize(results: list[dict], **context: object) -> dict:
    """Trials and wall of each search to :data:`TARGET` of the best of both."""
    target = TARGET * max(r["best"] or 0.0 for r in results)
    return {
        "summary": True,
        "target": f"{TARGET:.0%} of the best of both searches",
        "target_tokens_per_s": target,
        **{r["search"]: reached(r, target) | {"best": r["best"], "search_wall_s": r["wall_s"]} for r in results},
        **context,
    }


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="tiny")
    parser.add_argument("--cpu-procs", type=int, default=None)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-start", action="append", required=True)
    parser.add_argument("--trial-steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import optuna
    import torch

    settings = PlanSettings(
        workload=args.workload,
        trials=args.trials,
        seed=args.seed,
        cpu_procs=args.cpu_procs,
        budget=TrialBudget(warmup_steps=args.warmup_steps, timed_steps=args.trial_steps),
        warm_start=args.warm_start,
    )
    folder = Path(tempfile.mkdtemp(prefix="warm-start-"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("")
    results = []
    for mode in ("cold", "warm"):  # each search's line written when it ends, so a time limit keeps what finished
        # Each search compiles from nothing: the warm one must not reuse the cold one's kernels.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / f"{mode}-inductor")
        results.append(run_search(settings, f"sqlite:///{folder}/{mode}.db", f"bench-{mode}", mode == "warm"))
        with args.out.open("a") as f:
            f.write(json.dumps(results[-1]) + "\n")
    summary = summarize(
        results,
        workload=args.workload,
        cpu_procs=args.cpu_procs,
        trials=args.trials,
        seed=args.seed,
        cpu=_cpu_model(),
        cores=usable_cores(),
        compile_cache="fresh for each search",
        torch=torch.__version__,
        optuna=optuna.__version__,
        date=time.strftime("%Y-%m-%d", time.gmtime()),
    )
    with args.out.open("a") as f:
        f.write(json.dumps(summary) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
