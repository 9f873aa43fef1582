"""`autotune compare`: the committed phase8-small plans side by side, prices, refusals of
incomparable plans, a study's trials as a column, bad input (one line, exit 2, nothing
written), and the HTML page rendered headless by Chromium."""

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import zlib

import pytest

from autotune import compare as cmp
from autotune.errors import UserError
from tests.conftest import DEFAULT_PLAN, ROOT

PLAN_A = ROOT / "profiles" / "h200-phase8-small.plan.json"
PLAN_B = ROOT / "bench" / "results" / "plan-phase8-small-300s" / "after-issue12" / "phase8-small.plan.json"
CPU_PLAN = ROOT / "bench" / "results" / "cpu-procs" / "tiny-2procs.plan.json"


def _variant(tmp_path, name: str, base=PLAN_A, **sections) -> str:
    """A copy of ``base`` with sections changed: {"train.micro_batch_size": 48, ...}."""
    data = json.loads(base.read_text())
    for key, value in sections.items():
        section, _, field = key.partition(".")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_two_committed_plans_print_the_table_with_time_and_price(run_cli):
    code, out, err = run_cli("compare", PLAN_A, PLAN_B, "--cost-per-gpu-hour", "h200=3.50")
    assert code == 0, err
    for words in (
        "1 x NVIDIA H200",
        "7403d3bde085",
        "1,152,697",
        "1,151,384 ±0.6%",
        "60.9%",
        "24.00 GiB",
        "passed",
        "14 min",
        "$0.84 (h200)",
        "backend=cudnn",
    ):
        assert words in out, words


def test_json_has_the_figures_and_the_price_arithmetic(run_cli):
    code, out, _ = run_cli("compare", PLAN_A, PLAN_B, "--cost-per-gpu-hour", "H200=3.50", "--tokens", "2e9", "--json")
    assert code == 0
    data = json.loads(out)
    a, b = data["entries"]
    assert (a["gpu_name"], a["gpu_count"], a["mfu_peak_source"], a["loss_passed"]) == (
        "NVIDIA H200",
        1,
        "measured",
        True,
    )
    assert b["samples"] and b["spread"] == pytest.approx(0.006362, abs=1e-6)
    tps = a["tokens_per_s"]
    assert a["hours"] == pytest.approx(2e9 / tps / 3600)
    assert a["usd_per_billion"] == pytest.approx(1 * 3.50 * 1e9 / tps / 3600)  # 1 GPU x $/h x hours for 1e9
    assert data["differences"] == [] and data["prices"] == {"h200": 3.5} and data["tokens"] == 2 * 10**9


def test_differences_are_marked_and_cpu_plans_take_the_cpu_price(tmp_path):
    other = _variant(tmp_path, "mb48.plan.json", **{"train.micro_batch_size": 48})
    data = json.loads(PLAN_A.read_text())
    data["strategies"] = [s for s in data["strategies"] if s["name"] != "compile"]
    path = tmp_path / "nocompile.plan.json"
    path.write_text(json.dumps(data))
    c = cmp.compare([str(PLAN_A), other, str(path)], prices=cmp.parse_prices(["h200=2"]))
    assert c.differing() == {"micro-batch", "global batch", "strategy compile"}
    assert [e.strategies.get("compile", "-") for e in c.entries] == ["mode=default, scope=model"] * 2 + ["-"]
    cpu = cmp.compare([str(CPU_PLAN)], prices=cmp.parse_prices(["h200=3.5", "cpu=0.10"])).entries[0]
    assert (cpu.price_label, cpu.cpu_only, cpu.gpu_name) == ("cpu", True, None)
    assert cpu.usd_per_billion == pytest.approx(0.10 * 1e9 / cpu.tokens_per_s / 3600)  # one machine
    assert cmp.compare([str(CPU_PLAN)], prices=cmp.parse_prices(["h200=3.5"])).entries[0].usd_per_billion is None


def test_the_same_data_is_no_difference_however_it_is_written(tmp_path):
    """A plan recording its data's hash beside one that does not, and one path written two ways:
    the data row is not marked; two recorded hashes that differ are (under --force)."""
    hashed = _variant(tmp_path, "hashed.plan.json", data_identity="sha256:" + "a" * 64)
    c = cmp.compare([str(PLAN_A), hashed], prices=[])
    assert [e.data for e in c.entries] == ["default"] * 2 and "data" not in c.differing()
    slash = _variant(tmp_path, "slash.plan.json", **{"train.data": "data/tokens/"})
    dot = _variant(tmp_path, "dot.plan.json", **{"train.data": "./data/tokens"})
    assert "data" not in cmp.compare([slash, dot], prices=[]).differing()
    other = _variant(tmp_path, "other.plan.json", data_identity="sha256:" + "b" * 64)
    forced = cmp.compare([str(PLAN_A), hashed, other], prices=[], force=True)
    assert "data" in forced.differing() and forced.warnings


def test_plans_of_different_workloads_or_data_are_refused_unless_forced(tmp_path, run_cli):
    html = tmp_path / "page.html"
    code, out, err = run_cli("compare", PLAN_A, DEFAULT_PLAN, "--html", html)
    assert code == 2 and "different workloads" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert not html.exists() and out == ""
    other_data = _variant(tmp_path, "data.plan.json", **{"train.data": "/data/tokens"})
    code, _, err = run_cli("compare", PLAN_A, other_data)
    assert code == 2 and "different data" in err
    code, out, err = run_cli("compare", PLAN_A, DEFAULT_PLAN, "--force", "--html", html)
    assert code == 0 and "warning" in err and "compared anyway" in err and "tiny" in out and html.is_file()
    # A recorded data identity is compared where both entries have one (older plans have none).
    entries = cmp.compare([str(PLAN_A), str(PLAN_B)], prices=[]).entries
    assert cmp._incomparable([dataclasses.replace(entries[0], data_identity="abc"), entries[1]]) is None
    assert "different data" in cmp._incomparable(
        [dataclasses.replace(e, data_identity=i) for e, i in zip(entries, "ab")]
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--cost-per-gpu-hour", "h200=cheap"], "is not a number"),
        (["--cost-per-gpu-hour", "h200"], "expected LABEL=USD"),
        (["--cost-per-gpu-hour", "=3"], "expected LABEL=USD"),
        (["--cost-per-gpu-hour", "h200=-1"], ">= 0"),
        (["--tokens", "lots"], "--tokens"),
        (["MISSING"], "no such file"),
        (["BADVERSION"], "unsupported version"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, run_cli, args, words):
    args = [str(tmp_path / "missing.plan.json") if a == "MISSING" else a for a in args]
    if "BADVERSION" in args:
        args = [_variant(tmp_path, "v99.plan.json", schema_version=99)]
    html = tmp_path / "page.html"
    code, out, err = run_cli("compare", PLAN_A, *args, "--html", html)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert out == "" and not html.exists()


def test_a_study_shows_the_distribution_of_its_trials(tmp_path, run_cli, capsys):
    import optuna

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name="s1", storage=url, direction="maximize")
    plan = json.loads(PLAN_A.read_text())
    for tps in (100.0, 300.0, 200.0, 400.0):
        t = study.ask()
        t.set_user_attr("plan", plan)
        t.set_user_attr("figures", {"status": "ok", "tokens_per_s": tps, "mfu": 0.5, "mfu_peak_source": "measured"})
        study.tell(t, tps)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # not counted
    code, out, err = run_cli("compare", PLAN_A, f"{url}#s1", "--json")
    assert code == 0, err
    entry = json.loads(out)["entries"][1]
    assert entry["kind"] == "study" and entry["tokens_per_s"] == 400.0
    assert entry["trials"] == {"count": 4, "min": 100.0, "median": 250.0, "max": 400.0}
    code, out, _ = run_cli("compare", PLAN_A, f"{url}#s1")
    assert code == 0 and "median 250" in out and "(4 trials)" in out
    # A study named <workload>-<fingerprint> takes the machine of a plan of that fingerprint (its price too).
    named = optuna.copy_study(from_study_name="s1", from_storage=url, to_storage=url, to_study_name="w-7403d3bde085")
    assert named is None
    capsys.readouterr()  # Optuna's log line of the copy
    c = cmp.compare([str(PLAN_A), f"{url}#w-7403d3bde085"], prices=cmp.parse_prices(["h200=1"]))
    assert (c.entries[1].gpu_name, c.entries[1].fingerprint) == ("NVIDIA H200", "7403d3bde085")
    assert c.entries[1].usd_per_billion == pytest.approx(1e9 / 400.0 / 3600)
    for source, words in (
        (f"{url}#nope", "no study 'nope'"),
        (f"sqlite:///{tmp_path / 'none.db'}#s1", "no such database file"),
        ("postgresql://nobody@127.0.0.1:9/autotune#s1", "cannot connect"),
    ):
        code, _, err = run_cli("compare", PLAN_A, source)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "none.db").exists()


def _png_colours(path) -> int:
    """Distinct colours in a sample of an 8-bit RGB(A) PNG's rows (a tiny decoder via zlib)."""
    raw, chunks, pos = path.read_bytes(), [], 8
    width = height = channels = 0
    while pos < len(raw):
        length, kind = struct.unpack(">I4s", raw[pos : pos + 8])
        body = raw[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    data, stride, colours, prev = (
        zlib.decompress(b"".join(chunks)),
        width * channels,
        set(),
        bytearray(width * channels),
    )
    for y in range(height):  # undo each row's filter (PNG spec 9.2), keep a sample of pixels
        f, row = data[y * (stride + 1)], bytearray(data[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = row[i - channels] if i >= channels else 0
            b, cc = prev[i], prev[i - channels] if i >= channels else 0
            if f == 1:
                row[i] = (row[i] + a) & 255
            elif f == 2:
                row[i] = (row[i] + b) & 255
            elif f == 3:
                row[i] = (row[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - cc
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else cc)) & 255
        if y % 15 == 0:
            colours.update(bytes(row[x : x + 3]) for x in range(0, stride, channels * 7))
        prev = row
    return len(colours)


def test_the_html_page_renders_offline_in_headless_chromium(tmp_path, run_cli):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("AUTOTUNE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not installed (AUTOTUNE_REQUIRE_CHROMIUM=1): apt-get install chromium")
        pytest.skip("chromium is not installed")
    html = tmp_path / "compare.html"
    code, _, err = run_cli("compare", PLAN_A, PLAN_B, "--cost-per-gpu-hour", "h200=3.50", "--html", html)
    assert code == 0, err
    page = html.read_text()
    assert "<script src=" not in page and "Plotly.newPlot" in page and "$ per billion tokens" in page
    png = tmp_path / "compare.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={png}",
            "--window-size=1200,900",
            html.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
    )  # its profile in the temporary folder
    assert png.is_file() and png.stat().st_size > 20_000
    assert _png_colours(png) > 10  # bars, text and table: not a blank page


def test_parse_prices_and_tokens():
    assert cmp.parse_prices([" H200 = 3.5"]) == [cmp.Price(label="h200", usd_per_hour=3.5)]
    assert cmp.parse_tokens("1e9") == 10**9 and cmp.parse_tokens("1000") == 1000
    with pytest.raises(UserError):
        cmp.parse_tokens("0")
    with pytest.raises(UserError):
        cmp.parse_prices(["h200=nan"])
    assert (
        cmp.fmt_duration(2.5) == "2 h 30 min" and cmp.fmt_duration(0.25) == "15 min" and cmp.fmt_duration(None) == "-"
    )


def test_a_page_that_cannot_be_written_is_one_line_and_nothing_printed(tmp_path, run_cli):
    (tmp_path / "dir.html").mkdir()
    code, out, err = run_cli("compare", PLAN_A, "--html", tmp_path / "dir.html")
    assert code == 2 and "--html" in err and len(err.strip().splitlines()) == 1 and out == ""


def test_compare_imports_no_torch(python):
    """Comparing reads plans as data: the modules import neither torch nor the executor."""
    code = (
        "import sys, autotune.compare, autotune.cli.compare; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] "
        "== 'torch' or m in ('autotune.runtime.trainer', 'autotune.runtime.trial', 'autotune.runtime.measure')))"
    )
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
