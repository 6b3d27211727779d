"""Label normalisation: numeric strings that denote one number are one class; missing-value markers
are missing labels, never classes."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_csv_dataset
from imgcls.check import check_dataset
from imgcls.cli import main
from imgcls.data import load_dataset
from imgcls.data.classes import MISSING_LABELS, ClassMap, is_missing_label
from imgcls.errors import DataError

WORDS = st.sampled_from(["cat", "dog", "Bag", "T-shirt/top", "a b", "inf", "x1", "1x", "1,5"])
NUMBERS = st.one_of(st.integers(-10**6, 10**6).map(Decimal),
                    st.decimals(min_value=-1000, max_value=1000, places=3, allow_nan=False,
                                allow_infinity=False))


@st.composite
def written_forms(draw, value: Decimal) -> str:
    """One of the ways a CSV may write `value`: leading/trailing zeros, sign, exponent, spaces."""
    sign = "-" if value < 0 else draw(st.sampled_from(["", "+"]))
    digits = format(abs(value), "f")
    whole, _, frac = digits.partition(".")
    frac = frac.rstrip("0") + "0" * draw(st.integers(0, 2))
    text = "0" * draw(st.integers(0, 2)) + whole + ("." + frac if frac or draw(st.booleans()) else "")
    if draw(st.booleans()) and value == value.to_integral_value() and whole != "0":
        text = whole.rstrip("0") + "e" + str(len(whole) - len(whole.rstrip("0")))
        text = text if not text.startswith("e") else "0"
    pad = draw(st.sampled_from(["", " ", "  "]))
    return pad + sign + text + draw(st.sampled_from(["", " "]))


@st.composite
def label_columns(draw) -> list[str]:
    """A column mixing numbers in several written forms, words and missing-value markers."""
    values = draw(st.lists(NUMBERS, min_size=1, max_size=6))
    numbers = [draw(written_forms(v)) for v in values for _ in range(draw(st.integers(1, 3)))]
    words = draw(st.lists(WORDS, max_size=4))
    markers = draw(st.lists(st.sampled_from(sorted(MISSING_LABELS) + ["NaN", "N/A", "NULL", " None "]),
                            max_size=3))
    return draw(st.permutations(numbers + words + markers))


@settings(max_examples=150, deadline=None)
@given(label_columns(), st.randoms(use_true_random=False))
def test_class_map_is_stable_under_permutation_of_rows(column: list[str], rnd) -> None:
    shuffled = list(column)
    rnd.shuffle(shuffled)
    a, b = ClassMap.from_labels(column), ClassMap.from_labels(shuffled)
    assert a == b
    kept = [x for x in column if not is_missing_label(x)]
    assert a.encode(kept).tolist() == b.encode(kept).tolist()


@settings(max_examples=150, deadline=None)
@given(NUMBERS, st.data())
def test_equal_numbers_always_map_to_one_class(value: Decimal, data) -> None:
    forms = data.draw(st.lists(written_forms(value), min_size=1, max_size=5))
    others = data.draw(st.lists(WORDS, max_size=3))
    cm = ClassMap.from_labels(forms + others)
    codes = set(cm.encode(forms).tolist())
    assert len(codes) == 1, (forms, cm.labels)
    assert Decimal(cm.labels[codes.pop()]) == value


@settings(max_examples=150, deadline=None)
@given(st.lists(NUMBERS, min_size=2, max_size=8, unique=True), st.data())
def test_distinct_numbers_never_merge(values: list[Decimal], data) -> None:
    forms = [data.draw(written_forms(v)) for v in values]
    cm = ClassMap.from_labels(forms)
    assert cm.num_classes == len(values)
    assert sorted(cm.encode(forms).tolist()) == list(range(len(values)))
    # Numbers come out in numeric order.
    assert [Decimal(x) for x in cm.labels] == sorted(values)


@settings(max_examples=100, deadline=None)
@given(label_columns())
def test_missing_value_markers_never_become_classes(column: list[str]) -> None:
    cm = ClassMap.from_labels(column)
    assert not any(is_missing_label(label) for label in cm.labels)
    for marker in [x for x in column if is_missing_label(x)]:
        with pytest.raises(DataError, match="missing label"):
            cm.encode([marker])


def test_the_usual_markers_are_missing_whatever_their_case() -> None:
    for text in ["", " ", "NaN", "nan", "N/A", "n/a", "NA", "null", "NULL", "None", "-", "#N/A", "?"]:
        assert is_missing_label(text), text
    for text in ["0", "cat", "nano", "Nature", "--", "none of them"]:
        assert not is_missing_label(text), text


def test_one_written_form_per_number_whatever_the_rows_say() -> None:
    cm = ClassMap.from_labels(["1.0", "01", " 1 ", "1", "+1", "1e0", "2.50", "2.5", "0.5", ".5", "-0", "0"])
    assert cm.labels == ("0", "0.5", "1", "2.5")
    assert not cm.integer_labels
    assert cm.encode(["1.0", "01", "1"]).tolist() == [2, 2, 2]
    assert cm.decode([0, 3]) == ["0", "2.5"]


def test_integer_labels_0_to_9_keep_their_classes_and_order() -> None:
    cm = ClassMap.from_labels([str(i) for i in (3, 9, 0, 1, 8, 2, 7, 4, 6, 5)] * 2)
    assert cm.labels == tuple(str(i) for i in range(10)) and cm.integer_labels
    assert cm.decode([0, 9]) == [0, 9]
    # ...and one "1.0" among them no longer splits class 1 in two.
    with_float = ClassMap.from_labels([str(i) for i in range(10)] + ["1.0"])
    assert with_float == cm and with_float.encode(["1.0"]).tolist() == [1]


def test_numbers_come_before_words_and_words_keep_their_order() -> None:
    cm = ClassMap.from_labels(["dog", "10", "cat", "2", "02.0"])
    assert cm.labels == ("2", "10", "cat", "dog") and not cm.integer_labels
    assert ClassMap.from_labels(["T-shirt", "Bag", "Coat"]).labels == ("Bag", "Coat", "T-shirt")


def test_class_maps_saved_before_still_encode_their_labels() -> None:
    """classes.json written when '01' or '1.0' could be a class of its own still reads back."""
    old = ClassMap.from_json({"labels": ["01", "1.0", "cat"], "names": ["01", "1.0", "cat"],
                              "integer_labels": False})
    assert old.encode(["01", "1.0", "cat"]).tolist() == [0, 1, 2]
    assert ClassMap.from_json(ClassMap.from_labels(["1", "01"]).to_json()).encode(["001"]).tolist() == [0]


def write_labels(root: Path, labels: list[str]) -> Path:
    """The synthetic dataset with its train.csv labels replaced, one per row."""
    data = make_csv_dataset(root, n_per_class=len(labels) // 3 + 1)
    csv_file = data / "train" / "train.csv"
    rows = csv_file.read_text().splitlines()[1:len(labels) + 1]
    csv_file.write_text("id,label\n" + "".join(f"{r.split(',')[0]},{lab}\n" for r, lab in zip(rows, labels)))
    (data / "classes.json").unlink()
    return data / "train"


def test_dataset_with_1_01_and_1_0_has_one_class_1(tmp_path: Path) -> None:
    train = write_labels(tmp_path / "ds", ["1", "01", "1.0", " 1 ", "2", "2", "02"])
    data = load_dataset(train)
    assert data.classes.labels == ("1", "2") and data.classes.integer_labels
    assert data.targets.tolist() == [0, 0, 0, 0, 1, 1, 1]
    report = check_dataset(train)
    assert report.classes == {"1": 4, "2": 3}
    assert not [p for p in report.problems if p["kind"] == "label_variants"]


@pytest.mark.parametrize("marker", ["NaN", "N/A", "null", "None", "-"])
def test_a_missing_value_marker_is_reported_like_an_empty_label(tmp_path: Path, marker: str, capsys) -> None:
    train = write_labels(tmp_path / "ds", ["0", "1", "0", "1", marker, "0"])
    with pytest.raises(DataError, match=rf"train.csv row 6: missing label \({marker!r}"):
        load_dataset(train)
    report = check_dataset(train)
    problem = [p for p in report.errors if p["kind"] == "empty_label"]
    assert len(problem) == 1 and problem[0]["row"] == 6
    assert marker not in report.classes
    assert main(["train", str(train), "--out", str(tmp_path / "r"), "--model", "scratch-cnn-tiny",
                 "--epochs", "1"]) == DataError.exit_code
    err = capsys.readouterr().err
    assert "row 6" in err and "missing label" in err and "Traceback" not in err
