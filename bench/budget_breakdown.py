"""Where a study's wall time went: seconds in trials that ran ok, were pruned, or failed.

    python3 bench/budget_breakdown.py STUDIES_DB [--study NAME] [--json]

Each trial's time is Optuna's own record (datetime_start to datetime_complete), so it counts
the child's start-up and compilation too; a pruned-before-launch trial costs milliseconds.
The status is autotune's (user_attrs["status"]: ok, pruned, oom, nan, timeout, crash, ...),
grouped as ok / pruned / failed.
"""

from __future__ import annotations

import argparse
import json

import optuna

GROUPS = {"ok": "ok", "pruned": "pruned", "oom": "pruned", "unsupported": "pruned"}


PHASES = ("startup_s", "warmup_s", "timed_s")
"""What each trial's child measured of its own wall: start-up (Python, torch, the model built),
warm-up (compilation) and the timed steps; the rest is the parent's spawn and the child's exit."""


def breakdown(study: optuna.Study) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {g: {"trials": 0, "seconds": 0.0} for g in ("ok", "pruned", "failed")}
    out["phases"] = {p: 0.0 for p in PHASES} | {"trials": 0}
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start is None or t.datetime_complete is None:
            continue
        status = t.user_attrs.get("status", t.state.name.lower())
        group = GROUPS.get(status, "failed")
        out[group]["trials"] += 1
        out[group]["seconds"] += (t.datetime_complete - t.datetime_start).total_seconds()
        if all(p in t.user_attrs for p in PHASES):
            out["phases"]["trials"] += 1
            for p in PHASES:
                out["phases"][p] += t.user_attrs[p]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db")
    ap.add_argument("--study", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=args.study, storage=f"sqlite:///{args.db}")
    rows = breakdown(study)
    if args.json:
        print(json.dumps({"study": study.study_name, **rows}))
        return
    phases = rows.pop("phases")
    total = sum(r["seconds"] for r in rows.values())
    print(f"study {study.study_name}: {total:.0f} s in trials")
    for group, r in rows.items():
        print(
            f"  {group:<7} {int(r['trials']):>3} trials {r['seconds']:>7.1f} s  ({r['seconds'] / total:.0%})"
            if total
            else f"  {group}: 0"
        )
    if phases["trials"]:
        print(
            f"  of the {int(phases['trials'])} trials that recorded their phases: "
            + ", ".join(f"{p.removesuffix('_s')} {phases[p]:.1f} s" for p in PHASES)
        )


if __name__ == "__main__":
    main()
