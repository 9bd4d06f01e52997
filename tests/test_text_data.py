"""The data files of ``rmt-kd compress``: each bad file is refused before any model work with one message that names
the file, the problem and the fix; string labels (classes) and float labels (regression) work end to end."""

import json
import re

import pytest
from datasets import ClassLabel

from rmt_kd_hf.text_classification import DataTrainingArguments
from rmt_kd_hf.text_data import label_setup, load_raw_datasets

from .conftest import cli_compress, save_tiny_teacher

SENTENCES = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13", "w14"] * 4


def csv_text(labels: list) -> str:
    return "sentence,label\n" + "".join(f"{text},{label}\n" for text, label in zip(SENTENCES, labels, strict=True))


def jsonl_text(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


INT_CSV = csv_text([1, 0, 1, 0] * 4)
STRING_CSV = csv_text(["pos", "neg", "pos", "neg"] * 4)


def write_files(tmp_path, **files) -> dict:
    """``{split: path}``: the given ``split=(file name, text or bytes)``, else an integer-label csv per split."""
    files = {"train": ("train.csv", INT_CSV), "validation": ("validation.csv", INT_CSV), **files}
    paths = {}
    for split, (name, content) in files.items():
        paths[split] = tmp_path / name
        if isinstance(content, bytes):
            paths[split].write_bytes(content)
        elif content is not None:  # None: a path with no file
            paths[split].write_text(content, encoding="utf-8")
    return paths


def load(paths: dict, tmp_path):
    data_args = DataTrainingArguments(**{f"{split}_file": str(path) for split, path in paths.items()})
    raw = load_raw_datasets(data_args, cache_dir=str(tmp_path / "cache"))
    return raw, label_setup(raw)


# (case, the split whose file is bad, its name and content, what the message says after the file's name)
BAD_FILES = [
    ("zero bytes", "train", "train.csv", b"", r"is empty \(0 bytes\); add a header and data rows"),
    ("header only", "validation", "validation.csv", "sentence,label\n", r"has no rows .*add data rows"),
    ("empty json list", "test", "test.json", "[]", "has no rows"),
    ("unsupported extension", "train", "train.tsv", "sentence\tlabel\nw5\t1\n", r"must be \.csv, \.json or \.jsonl"),
    (
        "not utf-8",
        "validation",
        "validation.csv",
        "sentence,label\nw5,1\ncafé w6,0\n".encode("latin-1"),
        r"line 3 is not valid UTF-8 \(byte 0xe9 at column 4\); re-save the file as UTF-8",
    ),
    ("ragged csv", "train", "train.csv", "sentence,label\nw5,1\nw6,0,2\n", "cannot be read as csv: .*line 3"),
    ("broken json", "validation", "validation.jsonl", '{"sentence": "w5", "label": 1}\n{"sentence":', "cannot be read"),
    ("no label", "validation", "validation.csv", "sentence\nw5\n", r"has no 'label' column \(columns: \['sentence'\]"),
    ("no text", "test", "test.csv", "text,label\nw5,1\n", r"needs a 'sentence' column.*Rename the text column"),
    ("half a pair", "train", "train.csv", "sentence1,label\nw5,1\n", r"needs a 'sentence' column, or 'sentence1' and"),
    ("blank text", "validation", "validation.csv", "sentence,label\nw5,1\n,0\n", "column 'sentence' is empty at row 2"),
    (
        "spaces as text",
        "train",
        "train.jsonl",
        jsonl_text({"sentence": "  ", "label": 0}),
        "'sentence' is empty at row 1",
    ),
    ("number as text", "train", "train.jsonl", jsonl_text({"sentence": 5, "label": 0}), "'sentence' holds .*not text"),
    ("null label", "train", "train.csv", "sentence,label\nw5,1\nw6,0\nw7,\n", "row 3 has no label; fill it in"),
    (
        "multi-label",
        "train",
        "train.jsonl",
        jsonl_text({"sentence": "w5", "label": [1, 0]}, {"sentence": "w6", "label": [0, 1]}),
        "multi-label classification is not supported yet: train one binary teacher per label, or use single-label",
    ),
    (
        "mixed types in a file",
        "validation",
        "validation.jsonl",
        jsonl_text({"sentence": "w5", "label": 1}, {"sentence": "w6", "label": "neg"}),
        "labels must be all integers or all strings",
    ),
    ("mixed types across files", "validation", "validation.csv", STRING_CSV, "has string labels but .* integer labels"),
    ("unknown label", "validation", "validation.csv", csv_text([0, 1, 2, 3] * 4), r"labels \[2, 3\] do not occur in"),
    ("unknown test label", "test", "test.csv", csv_text([0, 7] * 8), r"labels \[7\] do not occur in --train_file"),
]


@pytest.mark.parametrize(
    ("split", "name", "content", "message"), [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES]
)
def test_bad_files_are_refused_with_the_file_and_the_problem(tmp_path, split, name, content, message):
    paths = write_files(tmp_path, **{split: (name, content)})
    with pytest.raises(ValueError, match=re.escape(str(paths[split])) + ".*" + message):
        load(paths, tmp_path)


def test_a_missing_file_names_its_option(tmp_path):
    paths = write_files(tmp_path, validation=("missing.csv", None))
    with pytest.raises(FileNotFoundError, match=f"--validation_file {re.escape(str(paths['validation']))} does not"):
        load(paths, tmp_path)


def test_string_labels_become_ids_of_the_sorted_training_labels(tmp_path):
    test_rows = jsonl_text({"sentence": "w5", "idx": 0})  # no labels: predictions only
    paths = write_files(
        tmp_path, train=("train.csv", STRING_CSV), validation=("v.csv", STRING_CSV), test=("t.jsonl", test_rows)
    )
    raw, (is_regression, label_list) = load(paths, tmp_path)
    assert not is_regression and label_list == ["neg", "pos"]
    assert raw["validation"].features["label"] == ClassLabel(names=["neg", "pos"])
    assert raw["train"]["label"][:2] == [1, 0] and "label" not in raw["test"].column_names


def test_integer_labels_sort_as_numbers_and_test_files_may_leave_them_blank_or_minus_one(tmp_path):
    labels = csv_text([10, 2] * 8)
    paths = write_files(tmp_path, train=("train.csv", labels), validation=("v.csv", labels), test=("t.csv", labels))
    raw, (_, label_list) = load(paths, tmp_path)
    assert label_list == ["2", "10"] and raw["validation"]["label"][:2] == [1, 0]
    for test_labels, expected in (("", None), (-1, [-1] * 16)):  # blank: the column is dropped; -1: GLUE's "none"
        paths["test"].write_text(csv_text([test_labels] * 16))
        raw, _ = load(paths, tmp_path)
        assert (raw["test"]["label"] if "label" in raw["test"].column_names else None) == expected


def test_float_labels_are_regression_whole_numbers_elsewhere_too(tmp_path):
    paths = write_files(
        tmp_path, train=("train.csv", csv_text([0.5, 1.25] * 8)), validation=("v.csv", csv_text([1, 0] * 8))
    )
    raw, (is_regression, label_list) = load(paths, tmp_path)
    assert is_regression and label_list is None
    assert raw["validation"].features["label"].dtype == "float32"


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict:
    """Tiny random BERT teachers with a word-level tokenizer: two classes, and one regression output."""
    root = tmp_path_factory.mktemp("teachers")
    return {num_labels: save_tiny_teacher(root / f"labels-{num_labels}", num_labels) for num_labels in (1, 2)}


def test_cli_string_labels_end_to_end(teachers, tmp_path):
    paths = write_files(tmp_path, train=("train.csv", STRING_CSV), validation=("validation.csv", STRING_CSV))
    assert cli_compress(teachers[2], paths, tmp_path / "out") == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}


def test_cli_float_labels_end_to_end(teachers, tmp_path):
    paths = write_files(tmp_path, train=("train.csv", csv_text([0.5, 1.25, 2.0, 3.5] * 4)))
    paths["validation"].write_text(csv_text([0.0, 1.0, 2.0, 3.0] * 4))
    # regression reports no accuracy: the floor is on pearson unless told otherwise
    assert cli_compress(teachers[1], paths, tmp_path / "out") == 0
    assert len(json.loads((tmp_path / "out" / "config.json").read_text())["id2label"]) == 1  # num_labels
    history = json.loads((tmp_path / "out" / "rmt_kd_history.json").read_text())
    assert history["config"]["compression_metric"] == "pearson" and "eval_pearson" in history["teacher"]


CLI_CASES = [
    "zero bytes",
    "unsupported extension",
    "not utf-8",
    "null label",
    "multi-label",
    "mixed types across files",
]


@pytest.mark.parametrize("case", [case for case in BAD_FILES if case[0] in CLI_CASES], ids=lambda case: case[0])
def test_cli_refuses_bad_files_before_any_work(teachers, tmp_path, capsys, case):
    _, split, name, content, message = case
    paths = write_files(tmp_path, **{split: (name, content)})
    capsys.readouterr()
    assert cli_compress(teachers[2], paths, tmp_path / "out") == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("rmt-kd compress: error: ") and str(paths[split]) in last_line
    assert re.search(message, last_line) and not (tmp_path / "out").exists()
