"""The cost model against peak memory measured on an H200 (committed bench results)."""

import json

import pytest

from autotune import catalog, costmodel
from autotune.workloads import load_workload
from tests.conftest import ROOT

MEASURED = ROOT / "bench" / "results" / "single_device_h200.jsonl"


def rows():
    out = []
    for line in MEASURED.read_text().splitlines():
        row = json.loads(line)
        if row["status"] == "ok" and row["workload"] == "phase8-small":
            out.append(pytest.param(row, id=row["variant"]))
    return out


@pytest.mark.parametrize("row", rows())
def test_peak_memory_within_15_percent_of_h200_measurement(row):
    workload = load_workload(row["workload"])
    configs = {name: catalog.get(name).parse(knobs) for name, knobs in row["strategies"].items()}
    estimate = costmodel.estimate(workload, row["micro_batch"], configs)
    error = estimate.peak_memory_bytes / row["peak_memory_bytes"] - 1
    assert abs(error) < 0.15, (row["variant"], f"{error:+.1%}", estimate.breakdown)
