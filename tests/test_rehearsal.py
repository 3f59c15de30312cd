"""The small fault rehearsal: a real two-node Ray cluster on this machine (devtools.rehearsal).

A clean build and a build during which one HTTP server stops for a while, the worker node is
killed mid-stage and started again, the driver is SIGKILLed and started again, and one parquet
write fails (the runner retries it), must give the same manifests and tar shards; `datakit verify` passes on both; no
Ray process of the cluster is left behind.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datakit import store
from devtools.rehearsal.__main__ import rehearse
from devtools.rehearsal import costs as costs_mod
from devtools.rehearsal.compare import compare_builds
from devtools.rehearsal.servers import ALL_STAGES


@pytest.mark.timeout(900)
def test_faults_on_a_two_node_cluster_leave_the_build_unchanged(tmp_path):
    # the clean build's slowest partition takes seconds: a 30 s stall timeout is only the lost node's
    result = rehearse(tmp_path, items=96, stages=ALL_STAGES, partition_size=12, label="ci", stall_timeout=30)

    compare = result["compare"]
    assert compare["problems"] == [], "\n".join(compare["problems"])
    assert "images.parquet" in compare["manifests"] and "shards.parquet" in compare["manifests"]
    assert compare["tars"] >= 1
    assert result["verify_clean"] == 0 and result["verify"] == 0
    events = " | ".join(result["fault_events"])
    assert "stopped" in events and "back after" in events, events
    assert "worker node killed" in events, events
    assert "driver SIGKILLed" in events, events  # at the planned point, or by the stall watchdog
    # the SIGKILLed driver, then the run that completes (the runner retries the failed write itself)
    assert result["fault_runs"] >= 2, events
    assert not (tmp_path / "fail-next-write").exists(), "the injected write failure never fired"
    assert result["leftover_processes"] == 0


def _manifest(folder, values):
    folder.mkdir(parents=True)
    table = pa.table({"image_id": ["b", "a", "c"], "attempts": [1, 1, 2], "width": values})
    pq.write_table(table, folder / "images.parquet")


def test_compare_builds_ignores_row_order_and_attempts_but_reports_values(tmp_path):
    _manifest(tmp_path / "x", [10, 20, 30])
    _manifest(tmp_path / "y", [10, 20, 30])
    same = compare_builds(tmp_path / "x", tmp_path / "y")
    assert same["problems"] == [] and same["attempts_differ"] == 0

    pq.write_table(pa.table({"image_id": ["a", "b", "c"], "attempts": [1, 3, 2], "width": [20, 10, 31]}),
                   tmp_path / "y" / "images.parquet")
    diff = compare_builds(tmp_path / "x", tmp_path / "y")
    assert diff["attempts_differ"] == 1
    assert len(diff["problems"]) == 1 and "images.parquet:width" in diff["problems"][0]


def test_the_flaky_file_system_fails_one_write_while_its_flag_exists(tmp_path):
    flag = tmp_path / "flag"
    flag.write_text("x")
    out = store.location(f"flaky://{tmp_path}/out", {"fail_flag": str(flag)})
    with pytest.raises(OSError, match="part.parquet.*injected by devtools.flakyfs"):
        store.atomic_write_table(out / "part.parquet", pa.table({"a": [1]}))
    assert not flag.exists() and not (tmp_path / "out" / "part.parquet").exists()
    store.atomic_write_table(out / "part.parquet", pa.table({"a": [1]}))  # the next write goes through
    assert pq.read_table(tmp_path / "out" / "part.parquet").column("a").to_pylist() == [1]



def test_projection_prices_the_paper_models_and_cites_its_gpu_figures():
    costs = {
        "download": {"s_per_item": 0.002, "survival": 1.0},
        "detect": {"s_per_item": 0.030, "survival": 1.0},
        "embed": {"s_per_item": 0.090, "survival": 0.5},
        "cluster": {"s_per_item": 0.0001, "survival": 0.5},
    }
    paper = {"detect": {"label": "SCRFD-10G", "cpu_ms": 49.0, "dlib_ms": 20.0},
             "embed": {"label": "ArcFace R100", "cpu_ms": 103.0, "dlib_ms": 76.0}}
    images = 3_600_000
    text = "\n".join(costs_mod.projection(costs, images=images, nodes=1, cpus=10, efficiency=1.0, paper=paper))
    for _, source in costs_mod.GPU_MS.values():
        assert source in text
    assert f"i.e. {49.0 / costs_mod.GPU_MS['detect'][0]:.0f}x one core" in text
    # CPU only: (download 2 + detect 30 - 20 + 49 + half of (embed 90 - 76 + 103)) ms a image on 10 CPUs,
    # plus cluster as one task
    cpu_h = ((2 + 30 - 20 + 49 + 0.5 * (90 - 76 + 103)) / 1000 * images / 10 + 0.5 * 0.0001 * images) / 3600
    assert f"CPU only : {cpu_h:6.2f} h" in text
