from __future__ import annotations

import pytest

from clbench.engine.tasks import MVTEC_CATEGORIES, PAPER_ORDER, is_counted, normalize_spec, resolve_tasks

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
        ("everything", "given", "unknown category 'everything'"),
        ("all", "random", "task_order: unknown value 'random'"),
        ([], "given", "empty"),
        (True, "given", "expected a list"),
    ],
)
def test_bad_specs(spec, order, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_tasks(spec, AVAILABLE, order)


# -- issue 11: unclear task errors --------------------------------------------------------------


@pytest.mark.parametrize("spec", ["capsule", " capsule ", ["capsule"]])
def test_C43_one_category_name_is_a_one_task_list(spec) -> None:
    assert resolve_tasks(spec, AVAILABLE) == ["capsule"]


@pytest.mark.parametrize("spec, expected", [(" 2", 2), ("2 ", 2), ("wood, bottle", ["wood", "bottle"]),
                                            ("all", "all"), ("mvtec", "mvtec"), ("a,", ["a"])])
def test_C44_spaces_around_a_count_or_a_list_are_ignored(spec, expected) -> None:
    assert normalize_spec(spec) == expected
    if expected == 2:
        assert resolve_tasks(spec, AVAILABLE) == ["bottle", "cable"]


def test_D28_no_categories_names_the_root_not_a_range() -> None:
    for spec in (2, "all", ["capsule"]):
        with pytest.raises(ValueError) as info:
            resolve_tasks(spec, [], root="ds/emptyroot")
        message = str(info.value)
        assert message.startswith("tasks: no categories in ds/emptyroot") and "1..0" not in message


def test_every_tasks_error_names_the_root() -> None:
    for spec in (["sofa"], 20, "paper10"):
        with pytest.raises(ValueError, match="in /data/x"):
            resolve_tasks(spec, ["bottle", "wood"], root="/data/x")


def test_D03b_a_folder_without_train_good_is_named_as_such() -> None:
    with pytest.raises(ValueError) as info:
        resolve_tasks(["capsule", "checker"], ["checker", "nut"], root="ds/d03b", incomplete=["capsule"])
    assert "category 'capsule' in ds/d03b has no train/good folder" in str(info.value)
    assert "unknown" not in str(info.value)


@pytest.mark.parametrize("keyword", ["all", "mvtec", "paper10"])
def test_a_category_named_like_a_keyword_is_refused_as_ambiguous(keyword: str) -> None:
    available = ["bottle", keyword]
    with pytest.raises(ValueError, match=f"'{keyword}' is both a keyword and a category in r: write it as a list"):
        resolve_tasks(keyword, available, root="r")
    assert resolve_tasks([keyword], available) == [keyword]  # the list form is the category


def test_a_count_that_is_also_a_numbered_category_is_refused() -> None:
    """BTAD's categories are 01, 02, 03: `--tasks 02` reaches here as the count 2."""
    with pytest.raises(ValueError, match="2 is a count, but a category in btad is named '02'"):
        resolve_tasks(2, ["01", "02", "03"], root="btad")
    assert resolve_tasks(["02"], ["01", "02", "03"]) == ["02"]
    assert resolve_tasks(5, [f"c{i}" for i in range(6)]) == [f"c{i}" for i in range(5)]


def test_counted_specs() -> None:
    assert is_counted(3) and is_counted(" 3") and is_counted("all")
    assert not is_counted("mvtec") and not is_counted(["a"]) and not is_counted("capsule")
