"""Sweeps on a Ray cluster (issue 14): a 2-node cluster simulated in this machine
(``ray.cluster_utils.Cluster``), a node removed mid-sweep while a cell is past its first step (the
cell is retried on another node and resumes from its checkpoint, no step trained twice), retries
only for system failures, the results-not-visible check, and the GPU request rule.

The cell functions below run in Ray workers, which cannot import this module: it is pickled by
value (``register_pickle_by_value``)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from clbench.engine.config import ConfigError
from clbench.sweep import Cell, CellResult, add_sweep_parser, make_executor, run_cell, run_sweep
from clbench.sweep.executors import SHARED_STORAGE, RayCellResult, RayExecutor, check_gpu_request

BASE = {"image_size": 32, "weights": "none", "device": "cpu", "synthetic": False,
        "method_params": {"n_features": 8, "layers": ["layer1"]}}


def sweep_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clbench")
    add_sweep_parser(parser.add_subparsers())
    return parser.parse_args(argv)


# -- the GPU rule and the flags (no Ray started) ----------------------------------------------------
def test_gpus_per_cell_rule_and_flags(tmp_path: Path, capsys) -> None:
    pytest.importorskip("ray")

    def cell(device: str | None) -> Cell:
        return Cell(f"c-{device}", {}, {} if device is None else {"device": device}, str(tmp_path))

    check_gpu_request([cell("cuda"), cell("auto"), cell(None)], 1)
    check_gpu_request([cell("cuda:1")], 0.5)
    check_gpu_request([cell("cpu"), cell("auto")], 0)
    with pytest.raises(ConfigError, match=r"^--gpus-per-cell 1: cell c-cpu has device 'cpu'; set device"):
        check_gpu_request([cell("auto"), cell("cpu")], 1)
    with pytest.raises(ConfigError, match=r"^cell c-cuda has device 'cuda' but requests no GPU from Ray; "
                                          r"pass --gpus-per-cell"):
        check_gpu_request([cell("cuda")], 0)
    with pytest.raises(ConfigError, match=r"--gpus-per-cell: 1.5 is not a GPU count"):
        RayExecutor(gpus_per_cell=1.5)
    with pytest.raises(ConfigError, match=r"--retries must be 0 or more, got -1"):
        RayExecutor(retries=-1)
    with pytest.raises(ConfigError, match=r"--gpus-per-cell applies to --executor ray only"):
        make_executor("local", 2, gpus_per_cell=1)
    with pytest.raises(ConfigError, match=r"--retries applies to --executor ray only"):
        make_executor("serial", retries=3)

    args = sweep_args(["sweep", "s.yaml", "--executor", "ray", "--gpus-per-cell", "0.5", "--retries", "4"])
    assert (args.gpus_per_cell, args.retries) == (0.5, 4)
    executor = make_executor("ray", gpus_per_cell=args.gpus_per_cell, retries=args.retries)
    assert (executor.gpus_per_cell, executor.retries) == (0.5, 4)
    assert make_executor("ray").retries == 2  # the default
    for bad, message in (("-1", "use 0, a fraction below 1"), ("1.5", "use 0, a fraction below 1"),
                         ("two", "is not a number of GPUs")):
        with pytest.raises(SystemExit):
            sweep_args(["sweep", "s.yaml", "--gpus-per-cell", bad])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep_args(["sweep", "s.yaml", "--retries", "-2"])
    assert "use 0 or more" in capsys.readouterr().err


def test_a_cpu_cell_with_gpus_is_refused_before_the_sweep_folder_exists(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "output_dir": str(tmp_path / "sweeps"),
                                    "base": {**BASE, "tasks": 1, "data_root": str(tmp_path)},
                                    "grid": {"seed": [0]}}))
    with pytest.raises(ConfigError, match="has device 'cpu'"):
        run_sweep(spec, RayExecutor(gpus_per_cell=1), echo=lambda _: None, dry_run=True)
    assert not (tmp_path / "sweeps").exists()


# -- a simulated 2-node cluster -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs (the driver's) and two worker nodes of 1 CPU and 1 (logical) GPU each."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def fake_cell(cell: Cell) -> CellResult:
    """Records each attempt (with the GPUs Ray gave it), then does what the cell's ``kind`` says."""
    import ray

    record = Path(cell.sweep_dir) / "attempts" / cell.name
    record.parent.mkdir(exist_ok=True)
    with record.open("a") as f:
        f.write(json.dumps({"gpus": ray.get_gpu_ids(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
    attempt = len(record.read_text().splitlines())
    kind = cell.params["kind"]
    if kind == "always-dies" or (kind == "dies-once" and attempt == 1):
        os._exit(1)  # the worker dies mid-cell
    if kind == "raises":
        raise ValueError("the cell's own error")
    if kind != "invisible":  # "invisible": says it ran, but nothing reached the shared folder
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        (cell.run_dir / "summary.json").write_text('{"complete": true}')
    return CellResult(cell.name, "ran")


@pytest.mark.slow
def test_system_failures_are_retried_own_errors_are_not_and_invisible_results_fail(cluster, tmp_path: Path) -> None:
    kinds = ("ok", "dies-once", "always-dies", "raises", "invisible")
    cells = [Cell(kind, {"kind": kind}, {}, str(tmp_path)) for kind in kinds]
    results = {r.name: r for r in RayExecutor(2, retries=1, gpus_per_cell=0.5).map(fake_cell, cells)}
    assert all(isinstance(r, RayCellResult) for r in results.values())
    assert {n: (r.status, r.attempts) for n, r in results.items()} == {
        "ok": ("ran", 1), "dies-once": ("ran", 2), "always-dies": ("failed", 2), "raises": ("failed", 1),
        "invisible": ("failed", 1)}
    assert "WorkerCrashedError" in results["always-dies"].error
    assert "ValueError" in results["raises"].error
    invisible = results["invisible"]
    assert invisible.error.startswith(f"cell invisible finished on node {invisible.node} but its results are not "
                                      f"visible at {tmp_path / 'runs' / 'invisible'}: {SHARED_STORAGE}")
    attempts = [json.loads(line) for kind in kinds for line in (tmp_path / "attempts" / kind).read_text().splitlines()]
    assert len(attempts) == 7 and all(a["gpus"] == [0] and a["cuda"] == "0" for a in attempts)  # 0.5 of GPU 0


def freeze_after_first_step(victim: str, marker: Path):
    """The sweep's cell function, except that the victim's first attempt stops its own worker
    (SIGSTOP) as soon as its log says step 0 is done, and tells the test where it is (``marker``)."""
    def cell_fn(cell: Cell) -> CellResult:
        if cell.name == victim and not marker.exists():
            threading.Thread(target=_freeze_when_step0_is_logged, args=(cell.log_path, marker), daemon=True).start()
        return run_cell(cell)
    return cell_fn


def _freeze_when_step0_is_logged(log_path: Path, marker: Path) -> None:
    import ray

    while not (log_path.is_file() and "step 0 (" in log_path.read_text()):
        time.sleep(0.02)
    where = {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
             "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}
    marker.with_suffix(".tmp").write_text(json.dumps(where))
    marker.with_suffix(".tmp").rename(marker)
    os.kill(os.getpid(), signal.SIGSTOP)


def _kill_node_when_frozen(cluster, marker: Path, sweep: threading.Thread) -> dict:
    """The node dies with the frozen cell: its raylet and workers, then (SIGKILL) the stopped worker
    the raylet leaves behind. The retry runs on the surviving node (no node is added: starting one
    costs seconds here, and ``Cluster.add_node`` only works from the main thread)."""
    while not marker.exists():
        if not sweep.is_alive():
            return {}
        time.sleep(0.05)
    where = json.loads(marker.read_text())
    node = next(n for n in cluster.list_all_nodes() if n.node_id == where["node"])
    cluster.remove_node(node, allow_graceful=False)
    os.kill(where["pid"], signal.SIGKILL)
    return where


@pytest.mark.slow
def test_a_cell_killed_with_its_node_is_retried_and_resumes_from_its_checkpoint(cluster, synthetic_root: Path,
                                                                               tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "output_dir": str(tmp_path / "sweeps"),
                                    "base": {**BASE, "tasks": 2, "data_root": str(synthetic_root)},
                                    "grid": {"seed": [0, 1]}}))
    victim, other = "padim-sequential-seed0", "padim-sequential-seed1"
    marker = tmp_path / "frozen.json"
    lines: list[str] = []
    done: dict = {}

    def sweep() -> None:
        done["outcome"] = run_sweep(spec, RayExecutor(2, retries=2), cell_fn=freeze_after_first_step(victim, marker),
                                    echo=lines.append)

    start = time.perf_counter()
    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    killed = _kill_node_when_frozen(cluster, marker, thread)
    thread.join(timeout=120)
    seconds = time.perf_counter() - start
    assert killed, f"the victim never reached its first step: {lines}"
    outcome = done["outcome"]
    assert killed["cuda"] == ""  # no GPU requested: the worker sees none, although its node has one

    results = outcome.results
    assert {n: (r.status, r.attempts) for n, r in results.items()} == {victim: ("resumed", 2), other: ("ran", 1)}
    assert not results[victim].node.endswith(f"({killed['node'][:8]})")  # finished on another node
    assert any(line.startswith("[") and "/2] resumed " + victim in line and "attempt 2)" in line for line in lines)
    assert lines[-1].startswith("sweep s: 2 of 2 cells complete, 0 failed")
    status = json.loads((outcome.sweep_dir / "status.json").read_text())["cells"]
    assert status[victim]["status"] == "complete" and status[victim]["attempts"] == 2

    log = (outcome.sweep_dir / "logs" / f"{victim}.log").read_text()
    assert log.count(f"cell {victim}: starting") == 1 and log.count(f"cell {victim}: resuming") == 1
    assert [log.count(f"step {k} (") for k in range(2)] == [1, 1]  # step 0 was not trained again
    import pandas as pd

    for name in (victim, other):
        metrics = pd.read_csv(outcome.sweep_dir / "runs" / name / "metrics.csv")
        assert not metrics.duplicated(["step", "trained_task", "eval_task", "metric"]).any()
        assert sorted(set(metrics.step)) == [0, 1] and len(metrics) == len(metrics.drop_duplicates())
    print(f"ray cluster sweep: 2 cells, victim {victim} killed with node {killed['node'][:8]} after step 0, "
          f"attempts {results[victim].attempts}, finished on {results[victim].node}, {seconds:.1f} s")
    print("\n".join(lines))
