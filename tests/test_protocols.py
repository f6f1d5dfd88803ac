"""Protocols (issue 13, part 3): steps that teach several categories, the presets of the field
(IUF's X-Y settings, UCAD's alphabetical orders, DNE's 10+1), lists of lists, schedule-aware
ACC/BWT/FM on hand-made non-square matrices, and an IUF-style 10-5 run end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clbench.data import ImageStore, Sample, SampleSet
from clbench.engine import config as cfg
from clbench.engine.tasks import (
    DNE_ORDER, MVTEC_CATEGORIES, VISA_CATEGORIES, as_schedule, resolve_schedule, resolve_tasks, schedule_value,
    step_label,
)
from clbench.metrics.forgetting import bwt, forgetting_measure, relative_forgetting, summarize
from strategies.base import Experience
from strategies.buffers import BalancedBuffer
from strategies.joint import Joint
from strategies.replay import Replay, by_category
from strategies.sequential import Sequential

SYNTH15 = [f"s{i:02d}" for i in range(15)]


def sizes(schedule) -> list[int]:
    return [len(step) for step in schedule]


# -- presets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ("mvtec:14-1", [14, 1]), ("mvtec:10-5", [10, 5]), ("mvtec:3x5", [3, 3, 3, 3, 3]),
    ("mvtec:10-1x5", [10, 1, 1, 1, 1, 1]), ("visa:11-1", [11, 1]), ("visa:8-4", [8, 4]),
    ("visa:8-1x4", [8, 1, 1, 1, 1]), ("dne", [10, 1, 1, 1, 1, 1]),
])
def test_iuf_visa_dne_presets_have_their_step_sizes(spec: str, expected: list[int]) -> None:
    available = VISA_CATEGORIES if spec.startswith("visa") else MVTEC_CATEGORIES
    schedule = resolve_schedule(spec, available)
    assert sizes(schedule) == expected
    assert sorted(n for step in schedule for n in step) == sorted(available)  # every category once


def test_preset_orders_are_the_papers() -> None:
    # IUF and UCAD: alphabetical (IUF's MVTec 3x5 step 1 ends at capsule, VisA 8-4 ends at pipe_fryum)
    assert resolve_schedule("mvtec:3x5", MVTEC_CATEGORIES)[0] == ("bottle", "cable", "capsule")
    assert resolve_schedule("mvtec:10-5", MVTEC_CATEGORIES)[1] == ("tile", "toothbrush", "transistor", "wood", "zipper")
    assert resolve_schedule("visa:8-4", VISA_CATEGORIES)[1] == ("pcb2", "pcb3", "pcb4", "pipe_fryum")
    assert resolve_tasks("mvtec", MVTEC_CATEGORIES) == sorted(MVTEC_CATEGORIES)  # UCAD's 15
    assert resolve_tasks("visa", VISA_CATEGORIES) == sorted(VISA_CATEGORIES)  # UCAD's 12
    assert len(VISA_CATEGORIES) == 12
    # DNE: its code's dataset_order 1, 10 base classes then one per step
    dne = resolve_schedule("dne", MVTEC_CATEGORIES)
    assert dne[0][:3] == ("leather", "bottle", "metal_nut") and dne[-1] == ("cable",)
    assert resolve_schedule("dne:3x5", MVTEC_CATEGORIES)[0] == DNE_ORDER[:3]


def test_a_bare_setting_runs_over_the_first_sorted_categories_of_any_dataset() -> None:
    schedule = resolve_schedule("10-5", list(reversed(SYNTH15)))
    assert schedule == [tuple(SYNTH15[:10]), tuple(SYNTH15[10:])]
    assert sizes(resolve_schedule("2x3", SYNTH15)) == [2, 2, 2]  # six of the fifteen


def test_every_form_of_before_is_one_category_per_step() -> None:
    for spec in (3, "all", ["s03", "s01"], "s02", "s01, s02"):
        schedule = resolve_schedule(spec, SYNTH15)
        assert schedule == [(name,) for name in resolve_tasks(spec, SYNTH15)]
        assert schedule_value(schedule) == resolve_tasks(spec, SYNTH15)  # config.yaml unchanged: a flat list


def test_list_of_lists_and_mixed_steps() -> None:
    spec = [["s00", "s01"], ["s02"], ["s03", "s04"]]
    assert resolve_schedule(spec, SYNTH15) == [("s00", "s01"), ("s02",), ("s03", "s04")]
    assert resolve_schedule([["s00", "s01"], "s02"], SYNTH15) == [("s00", "s01"), ("s02",)]
    assert schedule_value(resolve_schedule(spec, SYNTH15)) == spec
    assert as_schedule(spec) == [("s00", "s01"), ("s02",), ("s03", "s04")]


def test_shuffle_permutes_categories_and_keeps_step_sizes() -> None:
    schedule = resolve_schedule("10-5", SYNTH15, "shuffle", seed=3)
    assert sizes(schedule) == [10, 5]
    assert [n for step in schedule for n in step] == resolve_tasks(15, SYNTH15, "shuffle", seed=3)


def test_config_takes_lists_of_steps_and_protocols(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("tasks:\n  - [carpet, grid]\n  - [tile]\n")
    assert cfg.load(path).tasks == [["carpet", "grid"], ["tile"]]
    assert cfg.load(None, {"tasks": "visa:8-1x4"}).tasks == "visa:8-1x4"


@pytest.mark.parametrize("text, message", [
    ("tasks: mvtec:10-x\n", "tasks='mvtec:10-x' is not"),
    ("tasks: cars:3x5\n", "unknown preset 'cars'"),
    ("tasks: mvtec:10-10\n", "needs 20 categories, preset mvtec has 15"),
    ("tasks: [[a, b], []]\n", "a step must be a non-empty list of category names"),
])
def test_bad_protocols_in_a_config_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("spec, available, message", [
    ("visa:8-4", SYNTH15, "tasks: visa:8-4 needs category 'candle', not found in data/x (available: s00"),
    ("mvtec:10-5", [c for c in MVTEC_CATEGORIES if c != "tile"], "needs category 'tile', not found in data/x"),
    ("10-5", SYNTH15[:12], "tasks: 10-5 needs 15 categories, 12 found in data/x"),
    ("10-5", [*SYNTH15, "10-5"], "'10-5' is both a protocol and a category in data/x"),
    ([["s00"], "s01", ["s00"]], SYNTH15, "duplicate categories"),
])
def test_a_dataset_lacking_what_a_protocol_names_is_one_line(spec, available, message) -> None:
    with pytest.raises(ValueError) as info:
        resolve_schedule(spec, available, root="data/x")
    assert message in str(info.value) and "\n" not in str(info.value)


# -- strategies ---------------------------------------------------------------------------------
def test_strategies_teach_a_steps_categories_together() -> None:
    schedule = [tuple(SYNTH15[:10]), ("s10",), ("s11", "s12")]
    for strategy in (Sequential(), Replay()):
        steps = strategy.experiences(schedule)
        assert [e.task_names for e in steps] == schedule
        assert [e.label for e in steps] == ["s00+...+s09 (10)", "s10", "s11+s12"]
    joint = Joint().experiences(schedule)
    assert len(joint) == 1 and joint[0].task_names == tuple(SYNTH15[:13]) and joint[0].label == "joint"
    assert Sequential().experiences(["a", "b"]) == [Experience(0, "a", ("a",)), Experience(1, "b", ("b",))]
    assert step_label(["a", "b", "c"]) == "a+b+c"


class FakeStore(ImageStore):
    def image(self, sample: Sample) -> torch.Tensor:
        return torch.zeros((3, self.size, self.size), dtype=torch.uint8)


def samples_of(*names: str, n: int = 10) -> SampleSet:
    return SampleSet([Sample(f"{c}/train/good/{i}", Path("x"), None, 0, "good") for c in names for i in range(n)],
                     FakeStore(4))


def test_balanced_replay_balances_per_category_not_per_step() -> None:
    replay = Replay(buffer_size=12, policy="balanced")
    first = Experience(0, "a+b+c", ("a", "b", "c"))
    replay.after_step(first, samples_of("a", "b", "c"))
    assert replay.buffer.counts() == {"a": 4, "b": 4, "c": 4}  # 12 // 3 categories, not 12 for one step
    replay.after_step(Experience(1, "d", ("d",)), samples_of("d"))
    assert replay.buffer.counts() == {"a": 3, "b": 3, "c": 3, "d": 3}


def test_a_one_category_step_updates_the_buffer_as_before() -> None:
    old, new = BalancedBuffer(7, seed=5), BalancedBuffer(7, seed=5)
    for task in "abc":
        old.update(task, samples_of(task))
        new.update_step(by_category(Experience(0, task, (task,)), samples_of(task)))
    assert old.keys == new.keys and old.tasks == new.tasks


# -- schedule-aware metrics on hand-made matrices ------------------------------------------------
def test_two_steps_ten_five_style_by_hand() -> None:
    # categories a, b taught at step 0, c at step 1 (a 2-1 protocol)
    R = np.array([[0.9, 0.8, 0.5],
                  [0.7, 0.6, 0.95]])
    out = summarize(R, [0, 0, 1])
    # ACC: (0.7 + 0.6 + 0.95) / 3; BWT: ((0.7-0.9) + (0.6-0.8)) / 2; FM: only step 0 before the last
    # RF: a: 1 - 0.7/0.9 = 2/9, b: 1 - 0.6/0.8 = 1/4
    assert out == pytest.approx({"acc": 0.75, "bwt": -0.2, "fm": 0.2, "relative_forgetting": (2 / 9 + 1 / 4) / 2})


def test_three_steps_each_category_from_its_own_teaching_step_by_hand() -> None:
    # a, b taught at step 0, c at step 1, d at step 2 (2-1-1); c is high (0.99) before it is taught
    R = np.array([[0.90, 0.80, 0.99, 0.50],
                  [0.85, 0.90, 0.95, 0.55],
                  [0.70, 0.75, 0.80, 0.90]])
    taught = [0, 0, 1, 2]
    assert summarize(R, taught)["acc"] == pytest.approx((0.7 + 0.75 + 0.8 + 0.9) / 4)
    # BWT: final minus right after its teaching step: a 0.70-0.90, b 0.75-0.80, c 0.80-0.95; d excluded
    assert bwt(R, taught) == pytest.approx((-0.20 - 0.05 - 0.15) / 3)
    # FM: best from the teaching step to step 1: a 0.90, b 0.90 (step 1, not its teaching step), c 0.95
    # (not the 0.99 before it was taught)
    assert forgetting_measure(R, taught) == pytest.approx((0.20 + 0.15 + 0.15) / 3)
    # RF (the paper's): every earlier step, even before teaching: a 1-.7/.9, b 1-.75/.9, c 1-.8/.99
    assert relative_forgetting(R, taught) == pytest.approx((1 - 0.7 / 0.9 + 1 - 0.75 / 0.9 + 1 - 0.8 / 0.99) / 3)


def test_categories_taught_at_the_last_step_are_left_out() -> None:
    R = np.array([[0.9, 0.2, 0.3],
                  [0.6, 0.8, 0.7]])
    assert bwt(R, [0, 1, 1]) == pytest.approx(-0.3)  # only a
    assert forgetting_measure(R, [0, 1, 1]) == pytest.approx(0.3)
    everything_last = summarize(R, [1, 1, 1])
    assert everything_last["acc"] == pytest.approx(0.7)
    assert math.isnan(everything_last["bwt"]) and math.isnan(everything_last["fm"])


def test_one_category_per_step_equals_the_square_functions() -> None:
    rng = np.random.default_rng(0)
    for steps, tasks in ((4, 4), (6, 6), (5, 3)):
        R = rng.random((steps, tasks))
        assert summarize(R, list(range(tasks))) == summarize(R)


@pytest.mark.parametrize("taught, message", [([0, 1], "one integer step per task"), ([0, 2, 1], "steps in 0..1"),
                                             ([0.0, 1.0, 1.0], "one integer step per task")])
def test_a_wrong_schedule_is_refused(taught, message) -> None:
    with pytest.raises(ValueError, match=message):
        summarize(np.zeros((2, 3)), taught)


# -- end to end ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_iuf_10_5_run_on_15_synthetic_categories(tmp_path: Path) -> None:
    from clbench.data.synth import generate
    from clbench.engine.rundir import RunFolder
    from clbench.engine.runner import run_experiment

    root = tmp_path / "synthetic"
    generate(root, categories=15, size=32, seed=0, n_train=3, n_test_good=1, n_test_per_defect=1)
    config = cfg.RunConfig(method="padim", tasks="10-5", data_root=str(root), synthetic=False, image_size=32,
                           weights="none", device="cpu", output_dir=str(tmp_path / "out"), name="iuf")
    folder = RunFolder(run_experiment(config, progress=False))
    categories = sorted(p.name for p in root.iterdir() if p.is_dir())
    matrix = folder.accuracy_matrix("pixel_auroc", categories)
    assert matrix.shape == (2, 15) and list(matrix.columns) == categories
    assert list(matrix.index) == [f"step 0: {categories[0]}+...+{categories[9]} (10)",
                                  f"step 1: {categories[10]}+...+{categories[14]} (5)"]
    summary = json.loads(folder.summary_path.read_text())
    assert [s["tasks"] for s in summary["schedule"]] == [categories[:10], categories[10:]]
    assert summary["tasks"] == categories and summary["steps"] == 2
    R = matrix.to_numpy(dtype=float)
    stats = summary["metrics"]["pixel_auroc"]
    assert stats["bwt"] == pytest.approx(float(np.mean(R[1, :10] - R[0, :10])))
    assert stats["fm"] == pytest.approx(-stats["bwt"])  # two steps: the only earlier value is the taught one
    assert stats["acc"] == pytest.approx(float(R[1].mean()))
    assert folder.config()["tasks"] == [categories[:10], categories[10:]]
    for name in ("heatmap_pixel_auroc.png", "forgetting_pixel_auroc.png", "memory.png"):
        assert (folder.plots_dir / name).stat().st_size > 0
