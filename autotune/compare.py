"""`autotune compare`: plans (and studies) side by side, with time and price to train N tokens.

Torch-free: plans are read through ``autotune.plan.load`` (data only, nothing a plan names
is imported) and studies through Optuna. Everything is checked before anything is printed
or written: a bad price, a missing file or plans that cannot be compared are one UserError.

Prices: ``LABEL=USD`` per GPU-hour. LABEL matches a plan's GPU name case-insensitively as a
substring (``h200`` matches "NVIDIA H200"), or is ``cpu`` for plans made on a machine without
GPUs, priced per machine-hour. A plan is billed for the GPUs it runs on (one process per GPU:
``nproc_per_node x nnodes``), a CPU plan for its nodes.
"""

from __future__ import annotations

import html
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autotune import plan as planmod
from autotune.errors import UserError
from autotune.plan import Plan

BILLION = 1e9
DEFAULT_TOKENS = 10**9
"""Tokens of the training run whose time ``--tokens`` estimates by default."""
STUDY_SEPARATOR = "#"
"""A study is given as ``STORAGE_URL#STUDY`` (``sqlite:///plans/studies.db#tiny-d2b885a115d3``)."""


@dataclass(kw_only=True, slots=True)
class Price:
    label: str
    """Lower-case label: a substring of a GPU name, or ``cpu``."""
    usd_per_hour: float
    """US dollars per GPU-hour (per machine-hour for ``cpu``)."""


@dataclass(kw_only=True, slots=True)
class TrialSpread:
    """Tokens/s of a study's completed trials."""

    count: int
    """Completed trials with a tokens/s figure."""
    min: float
    """Slowest trial's tokens/s."""
    median: float
    """Median trial's tokens/s."""
    max: float
    """Fastest trial's tokens/s."""


@dataclass(kw_only=True, slots=True)
class Entry:
    """One column of the comparison: a plan, or a study (its best completed trial's plan)."""

    source: str
    """The plan's path, or ``STORAGE_URL#STUDY``."""
    kind: str
    """"plan" or "study"."""
    workload: str
    """Workload name with its overrides, as the refusal compares them."""
    data: str
    """``train.data`` of the plan, normalised (``data/x/`` and ``./data/x`` are ``data/x``)."""
    data_identity: str | None
    """The plan's ``data_identity`` where it records one (a content hash of the data)."""
    gpu_name: str | None
    """GPU model from the plan's hardware summary; None: no GPUs or not recorded."""
    gpu_count: int
    """GPUs of the machine the plan was made on (0: none or not recorded)."""
    cpu_only: bool
    """The summary says the machine had no GPU (a ``cpu`` price applies)."""
    machine: str
    """Readable machine line: GPUs, CPU, links where recorded."""
    links: str | None
    """The links between GPUs where the summary records them."""
    fingerprint: str | None
    """Hardware fingerprint the plan was made on; None: any machine."""
    processes: int
    """Processes of the run (nproc_per_node x nnodes)."""
    nnodes: int
    """Nodes of the run."""
    micro_batch_size: int
    """Samples per micro-batch per process."""
    global_batch: int | None
    """Samples per optimizer step over all processes (None: could not be worked out)."""
    strategies: dict[str, str] = field(default_factory=dict)
    """Strategy name -> its knobs as "k=v, ..." (in plan order)."""
    tokens_per_s: float | None = None
    """Measured tokens/s (a study: its best completed trial)."""
    spread: float | None = None
    """Relative half-range of the confirmation samples (None: one run)."""
    samples: list[float] | None = None
    """Tokens/s of each confirmation run."""
    mfu: float | None = None
    """Model FLOPs utilisation."""
    mfu_peak_source: str | None = None
    """Peak the MFU is against: "measured" or "datasheet"."""
    peak_memory_bytes: int | None = None
    """Peak device memory per process."""
    loss_passed: bool | None = None
    """The loss check's verdict (None: no loss check recorded)."""
    loss_tolerance: float | None = None
    """The loss check's relative tolerance."""
    trials: TrialSpread | None = None
    """A study's distribution of trial tokens/s (None for a plan)."""
    hours: float | None = None
    """Hours to train ``tokens`` tokens at tokens_per_s."""
    price_label: str | None = None
    """The --cost-per-gpu-hour label that priced this entry."""
    usd_per_billion: float | None = None
    """US dollars to train 1e9 tokens: billed units x USD/h x hours for 1e9 tokens."""


@dataclass(kw_only=True, slots=True)
class Comparison:
    entries: list[Entry]
    """The columns, in the order given."""
    tokens: int
    """Tokens whose training time is estimated."""
    prices: list[Price]
    """The prices given."""
    warnings: list[str]
    """Lines to print (incomparable plans under --force)."""

    def differing(self) -> set[str]:
        """Names of the setting rows whose values differ between entries (the marked ones)."""
        return {label for label, _, mark in table_rows(self) if mark}

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "prices": {p.label: p.usd_per_hour for p in self.prices},
            "warnings": self.warnings,
            "differences": sorted(self.differing()),
            "entries": [asdict(e) for e in self.entries],
        }


def parse_prices(items: list[str]) -> list[Price]:
    """``LABEL=USD`` items; a malformed one or a price that is not a positive number is a UserError."""
    prices = []
    for item in items:
        label, sep, usd = item.partition("=")
        if not sep or not label.strip():
            raise UserError(f"--cost-per-gpu-hour {item!r}: expected LABEL=USD (e.g. h200=3.50)")
        try:
            value = float(usd)
        except ValueError:
            raise UserError(f"--cost-per-gpu-hour {item!r}: the price {usd!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--cost-per-gpu-hour {item!r}: the price must be a finite number >= 0")
        prices.append(Price(label=label.strip().lower(), usd_per_hour=value))
    return prices


def parse_tokens(text: str) -> int:
    """A positive token count, as an integer or in scientific notation (1e9)."""
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--tokens {text!r} is not a number") from None
    if not math.isfinite(value) or value < 1:
        raise UserError(f"--tokens {text!r} must be at least 1")
    return int(value)


def is_study(source: str) -> bool:
    """``STORAGE_URL#STUDY`` (a URL with a scheme and a study name) rather than a plan path."""
    url, sep, name = source.rpartition(STUDY_SEPARATOR)
    return bool(sep and name and "://" in url)


def compare(
    sources: list[str], *, prices: list[Price], tokens: int = DEFAULT_TOKENS, force: bool = False
) -> Comparison:
    """Load every source, refuse incomparable ones (unless ``force``), and work out the figures."""
    if not sources:
        raise UserError("give at least one PLAN (or STORAGE_URL#STUDY)")
    entries = [_study_entry(s) if is_study(s) else _plan_entry(s, planmod.load(s)) for s in sources]
    _machines_of_studies(entries)
    warnings = []
    problem = _incomparable(entries)
    if problem:
        if not force:
            raise UserError(f"{problem}: their tokens/s are not comparable (--force compares them anyway)")
        warnings.append(f"{problem}: their tokens/s are not comparable (compared anyway: --force)")
    for e in entries:
        _price(e, prices, tokens)
    return Comparison(entries=entries, tokens=tokens, prices=prices, warnings=warnings)


def _incomparable(entries: list[Entry]) -> str | None:
    """What makes the entries incomparable: different workloads or data; None: nothing."""
    for attr, what in (("workload", "workloads"), ("data", "data"), ("data_identity", "data")):
        groups: dict[str, list[str]] = {}
        for e in entries:
            if getattr(e, attr) is not None:  # a data identity is compared where plans record one
                groups.setdefault(getattr(e, attr), []).append(e.source)
        if len(groups) > 1:
            return f"the plans are of different {what} ({_groups(groups)})"
    return None


def _groups(groups: dict[str, list[str]]) -> str:
    """ "phase8-small: a.plan.json and 2 more; tiny: b.plan.json", each value cut to 60 characters."""

    def one(value: str, sources: list[str]) -> str:
        value = value if len(value) <= 60 else value[:57] + "..."
        return f"{value}: {sources[0]}" + (f" and {len(sources) - 1} more" if len(sources) > 1 else "")

    return "; ".join(one(v, s) for v, s in groups.items())


def _workload(plan: Plan) -> str:
    overrides = ", ".join(f"{k}={v}" for k, v in sorted(plan.workload.overrides.items()))
    return plan.workload.name + (f" ({overrides})" if overrides else "")


def _gpus(summary: dict[str, Any]) -> tuple[str | None, int]:
    """(GPU name, count) from a summary's "gpus" ("2 x NVIDIA H200", "none")."""
    text = str(summary.get("gpus", "")).strip()
    count, sep, name = text.partition(" x ")
    if sep and count.strip().isdigit():
        return name.strip(), int(count)
    return None, 0


def _plan_entry(source: str, plan: Plan) -> Entry:
    summary = plan.hardware.summary
    gpu_name, gpu_count = _gpus(summary)
    links = summary.get("links") or summary.get("interconnect")
    parts = [f"{gpu_count} x {gpu_name}" if gpu_name else ("no GPU" if "gpus" in summary else "any machine")]
    if summary.get("cpu"):
        parts.append(str(summary["cpu"]))
    if links:
        parts.append(f"links: {links}")
    try:
        global_batch = plan.global_batch()
    except Exception:  # a mesh this machine's rules reject: show the rest anyway
        global_batch = None
    m, check = plan.measured, plan.loss_check
    return Entry(
        source=source,
        kind="plan",
        workload=_workload(plan),
        data=os.path.normpath(plan.train.data),
        data_identity=getattr(plan, "data_identity", None),  # recorded by newer plans (issue 14 item 2)
        gpu_name=gpu_name,
        gpu_count=gpu_count,
        cpu_only=str(summary.get("gpus", "")).strip() == "none",
        machine=", ".join(parts),
        links=str(links) if links else None,
        fingerprint=plan.hardware.fingerprint,
        processes=plan.launch.nproc_per_node * plan.launch.nnodes,
        nnodes=plan.launch.nnodes,
        micro_batch_size=plan.train.micro_batch_size,
        global_batch=global_batch,
        strategies={s.name: ", ".join(f"{k}={v}" for k, v in s.knobs.items()) or "(defaults)" for s in plan.strategies},
        tokens_per_s=m and m.tokens_per_s,
        spread=m and m.spread,
        samples=m and m.samples,
        mfu=m and m.mfu,
        mfu_peak_source=m and m.mfu_peak_source,
        peak_memory_bytes=m and m.peak_memory_bytes,
        loss_passed=check and check.passed,
        loss_tolerance=check and check.tolerance,
    )


def _study_entry(source: str) -> Entry:
    """A study's column: its best completed trial's plan, and the spread of all its trials."""
    import optuna

    from autotune.planning.study import make_storage  # a server that does not answer: one line within seconds

    url, _, name = source.rpartition(STUDY_SEPARATOR)
    storage = make_storage(url, existing=True)  # a SQLite file that is not Optuna's is left alone
    try:
        names = sorted(s.study_name for s in storage.get_all_studies())
    except Exception as e:  # SQLAlchemy's errors of a database that is not Optuna's, or went away
        raise UserError(f"study {source}: {(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None
    if name not in names:
        raise UserError(f"no study {name!r} in {url} (it holds: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=name, storage=storage)
    runs = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        tps = (t.user_attrs.get("figures") or {}).get("tokens_per_s")
        if tps and "plan" in t.user_attrs:
            runs.append((float(tps), t))
    if not runs:
        raise UserError(f"study {source}: no completed trial with a tokens/s figure")
    best_tps, best = max(runs, key=lambda r: r[0])
    try:
        plan = planmod.from_dict(best.user_attrs["plan"])
    except Exception as e:
        raise UserError(f"study {source}: trial {best.number}'s plan is not valid: {e}") from None
    entry = _plan_entry(source, plan)
    entry.kind = "study"
    figures = best.user_attrs["figures"]
    entry.tokens_per_s, entry.spread, entry.samples = best_tps, None, None
    entry.mfu, entry.mfu_peak_source = figures.get("mfu"), figures.get("mfu_peak_source")
    entry.peak_memory_bytes, entry.loss_passed, entry.loss_tolerance = figures.get("peak_memory_bytes"), None, None
    values = sorted(r[0] for r in runs)
    entry.trials = TrialSpread(count=len(values), min=values[0], median=statistics.median(values), max=values[-1])
    return entry


def _machines_of_studies(entries: list[Entry]) -> None:
    """A trial's plan records no machine; a study is named ``<workload>-<fingerprint>``, so a
    study takes the machine of a plan given with the same fingerprint (the fingerprint is a hash
    of the GPU model and count, links, driver and CPU)."""
    for e in entries:
        if e.kind != "study" or e.fingerprint is not None:
            continue
        tail = e.source.rpartition(STUDY_SEPARATOR)[2].rpartition("-")[2]
        if len(tail) == 12 and all(ch in "0123456789abcdef" for ch in tail):
            e.fingerprint = tail
            e.machine = "not recorded in the study"
        same = next((p for p in entries if p.kind == "plan" and p.fingerprint == e.fingerprint and e.fingerprint), None)
        if same is not None:
            e.gpu_name, e.gpu_count, e.cpu_only, e.links = same.gpu_name, same.gpu_count, same.cpu_only, same.links
            e.machine = same.machine


def _price(e: Entry, prices: list[Price], tokens: int) -> None:
    """Fill in the hours for ``tokens`` and, where a price matches, $ per billion tokens. A
    tokens/s that is no rate (NaN, infinite, negative) or too small for the arithmetic (1e-300:
    the hours overflow) is a UserError naming its source: a plan or a study from elsewhere."""
    if not e.tokens_per_s:
        return
    if not (math.isfinite(e.tokens_per_s) and e.tokens_per_s > 0):
        raise UserError(f"{e.source}: measured tokens/s {e.tokens_per_s!r} is not a positive number")
    e.hours = tokens / e.tokens_per_s / 3600
    for p in prices:
        if (e.gpu_name and p.label in e.gpu_name.lower()) or (p.label == "cpu" and e.cpu_only):
            units = e.processes if e.gpu_name else e.nnodes
            e.price_label = p.label
            e.usd_per_billion = units * p.usd_per_hour * BILLION / e.tokens_per_s / 3600
            break
    if not (math.isfinite(e.hours) and math.isfinite(e.usd_per_billion or 0)):
        raise UserError(
            f"{e.source}: measured tokens/s {e.tokens_per_s!r} is too small to estimate the time for "
            f"{tokens:.3g} tokens"
        )


# ---- presentation: the rows of the table, shared by the terminal, JSON's "differences" and HTML.


def fmt_duration(hours: float | None) -> str:
    """ "3 h 05 min", "14 min", "42 s"; "-" for None."""
    if hours is None:
        return "-"
    seconds = hours * 3600
    if seconds < 60:
        return f"{seconds:.0f} s"
    if hours < 1:
        return f"{seconds / 60:.0f} min"
    whole = int(hours)
    return f"{whole:,} h {round((hours - whole) * 60):02d} min"


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _tokens_cell(e: Entry) -> str:
    cell = _num(e.tokens_per_s, "{:,.0f}")
    if e.spread is not None:
        cell += f" ±{e.spread:.1%}" + (f" ({len(e.samples)} runs)" if e.samples else "")
    return cell


def _loss_cell(e: Entry) -> str:
    if e.loss_passed is None:
        return "-"
    return ("passed" if e.loss_passed else "FAILED") + _num(e.loss_tolerance, " (tolerance {:.1%})")


def table_rows(c: Comparison) -> list[tuple[str, list[str], bool]]:
    """(row label, one cell per entry, whether the row is marked as a difference), in display order."""
    es = c.entries
    rows: list[tuple[str, list[str]]] = [
        ("kind", [e.kind for e in es]),
        ("workload", [e.workload for e in es]),
        ("data", [e.data + (f" [{e.data_identity}]" if e.data_identity else "") for e in es]),
        ("machine", [e.machine for e in es]),
        ("fingerprint", [e.fingerprint or "any" for e in es]),
        ("processes", [f"{e.processes} ({e.nnodes} node{'s' if e.nnodes > 1 else ''})" for e in es]),
        ("micro-batch", [str(e.micro_batch_size) for e in es]),
        ("global batch", [_num(e.global_batch, "{}") for e in es]),
    ]
    names: list[str] = []
    for e in es:
        names += [n for n in e.strategies if n not in names]
    rows += [(f"strategy {n}", [e.strategies.get(n, "-") for e in es]) for n in names]
    rows += [
        ("tokens/s", [_tokens_cell(e) for e in es]),
        ("MFU", [_num(e.mfu, "{:.1%}") + (f" ({e.mfu_peak_source} peak)" if e.mfu_peak_source else "") for e in es]),
        ("peak memory", [_num(e.peak_memory_bytes and e.peak_memory_bytes / 2**30, "{:.2f} GiB") for e in es]),
        ("loss check", [_loss_cell(e) for e in es]),
    ]
    if any(e.trials for e in es):
        rows.append(
            (
                "trials tokens/s",
                [
                    f"min {t.min:,.0f} / median {t.median:,.0f} / max {t.max:,.0f} ({t.count} trials)"
                    if (t := e.trials)
                    else "-"
                    for e in es
                ],
            )
        )
    rows.append((f"time for {c.tokens:.3g} tokens", [fmt_duration(e.hours) for e in es]))
    if c.prices:
        rows.append(
            (
                "$ per 1e9 tokens",
                [
                    f"${e.usd_per_billion:,.2f} ({e.price_label})" if e.usd_per_billion is not None else "- (no price)"
                    for e in es
                ],
            )
        )
    return [(label, values, _data_differs(es) if label == "data" else marked(label, values)) for label, values in rows]


def _data_differs(entries: list[Entry]) -> bool:
    """Whether the entries' data differ, as the refusal of incomparable plans sees it: by name,
    or by the content hashes of those that record one (a plan without one is no difference)."""
    return len({e.data for e in entries}) > 1 or len({e.data_identity for e in entries if e.data_identity}) > 1


# Rows whose differences are the point of the comparison (measurements), not a property to flag.
_MEASURED = ("kind", "tokens/s", "MFU", "peak memory", "loss check", "trials tokens/s", "time for", "$ per")


def marked(label: str, values: list[str]) -> bool:
    """Whether a row is marked as a difference between the plans: a setting that differs."""
    return len(values) > 1 and len(set(values)) > 1 and not label.startswith(_MEASURED)


def to_html(c: Comparison) -> str:
    """A self-contained page: tokens/s per entry (spread as error bars), $ per 1e9 tokens
    where prices are given, and the table. plotly.js is inlined, so it opens offline."""
    import plotly.graph_objects as go
    import plotly.io as pio

    names = [f"#{i} {_short(e.source)}" for i, e in enumerate(c.entries, 1)]
    ticks = [f"#{i}" for i in range(1, len(c.entries) + 1)]  # the table heads name them in full
    tps = [e.tokens_per_s or 0 for e in c.entries]
    plus, minus = zip(*(_error_bar(e) for e in c.entries))
    speed = go.Figure(
        go.Bar(
            x=ticks,
            y=tps,
            hovertext=names,
            text=[f"{v:,.0f}" for v in tps],
            textposition="outside",
            error_y=dict(type="data", array=list(plus), arrayminus=list(minus), symmetric=False),
        )
    )
    speed.update_layout(title="tokens/s", yaxis_title="tokens/s", height=380, width=560, margin=dict(t=60, b=40))
    parts = [pio.to_html(speed, include_plotlyjs=True, full_html=False)]
    priced = [(n, e.usd_per_billion) for n, e in zip(ticks, c.entries) if e.usd_per_billion is not None]
    if priced:
        cost = go.Figure(
            go.Bar(
                x=[n for n, _ in priced],
                y=[v for _, v in priced],
                marker_color="#d62728",
                text=[f"${v:,.2f}" for _, v in priced],
                textposition="outside",
            )
        )
        cost.update_layout(
            title="$ per billion tokens", yaxis_title="USD", height=380, width=560, margin=dict(t=60, b=40)
        )
        parts.append(pio.to_html(cost, include_plotlyjs=False, full_html=False))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = []
    for label, values, mark in table_rows(c):
        cells = "".join(f"<td{' class=diff' if mark else ''}>{html.escape(v)}</td>" for v in values)
        body.append(f"<tr><th>{html.escape(label)}{' *' if mark else ''}</th>{cells}</tr>")
    warn = "".join(f"<p class=warn>{html.escape(w)}</p>" for w in c.warnings)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>autotune compare</title><style>"
        "body{font-family:sans-serif;margin:16px} table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
        ".diff{font-weight:bold;background:#fff3c4} .warn{color:#a00}</style></head><body>"
        f"<h2>autotune compare</h2>{warn}<div style='display:flex;flex-wrap:wrap'>{''.join(parts)}</div>"
        f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"
        "<p>* a setting that differs between the plans. Error bars: a plan's confirmation spread (half-range), "
        "a study's trials from min to max. Prices: --cost-per-gpu-hour.</p></body></html>\n"
    )


def _error_bar(e: Entry) -> tuple[float, float]:
    """(above, below) tokens/s: a study's trials from min to max, else the confirmation's half-range."""
    if e.trials and e.tokens_per_s:
        return e.trials.max - e.tokens_per_s, e.tokens_per_s - e.trials.min
    half = (e.spread or 0) * (e.tokens_per_s or 0)
    return half, half


def _short(source: str) -> str:
    """A column name: the plan's path under the current directory, or the study's name."""
    if is_study(source):
        return source.rpartition(STUDY_SEPARATOR)[2]
    try:
        return str(Path(source).resolve().relative_to(Path.cwd()))
    except ValueError:
        return source
