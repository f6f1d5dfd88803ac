from __future__ import annotations

import pytest

from clbench.tasks import MVTEC_CATEGORIES, PAPER_ORDER, resolve_tasks

AVAILABLE = list(MVTEC_CATEGORIES)


def test_specs() -> None:
    assert resolve_tasks("all", AVAILABLE) == sorted(AVAILABLE)
    assert resolve_tasks(3, AVAILABLE) == ["bottle", "cable", "capsule"]
    assert resolve_tasks("paper10", AVAILABLE) == list(PAPER_ORDER)
    assert resolve_tasks(["wood", "bottle"], AVAILABLE) == ["wood", "bottle"]
    assert len(MVTEC_CATEGORIES) == 15 and set(PAPER_ORDER) <= set(MVTEC_CATEGORIES)


def test_shuffle_is_seeded_permutation() -> None:
    a = resolve_tasks("all", AVAILABLE, "shuffle", seed=1)
    assert a == resolve_tasks("all", AVAILABLE, "shuffle", seed=1)
    assert a != resolve_tasks("all", AVAILABLE, "shuffle", seed=2)
    assert sorted(a) == sorted(AVAILABLE)


@pytest.mark.parametrize(
    "spec, order, message",
    [
        (["bottle", "sofa"], "given", "unknown category 'sofa'"),
        (["bottle", "bottle"], "given", "duplicate"),
        (0, "given", "out of range"),
        ("everything", "given", "unknown spec 'everything'"),
        ("all", "random", "task_order: unknown value 'random'"),
        ([], "given", "empty"),
    ],
)
def test_bad_specs(spec, order, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_tasks(spec, AVAILABLE, order)
