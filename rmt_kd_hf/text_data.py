"""The data of ``rmt-kd compress``: GLUE from the hub, or the user's csv/json/jsonl files, checked before model work.

Local files are refused, each with one ``ValueError`` that names the option, the file, the problem (with its row or
column) and the fix, rather than with a traceback from inside datasets/pyarrow/pandas or the tokenizer later on. Rows
are counted from 1, without the csv header; lines (for bytes that are not UTF-8) are the file's physical lines.

Class labels leave :func:`load_raw_datasets` as ``ClassLabel`` ids in every split (the sorted training labels, as
strings, are its names), as the hub's GLUE labels do; regression labels (floats) as ``float32``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, LargeList, List, Value, load_dataset, load_dataset_builder
from datasets.exceptions import DatasetGenerationError

TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}

BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json"}
OPTIONS = {"train": "--train_file", "validation": "--validation_file", "test": "--test_file"}
MULTI_LABEL_HELP = (
    "multi-label classification is not supported yet: train one binary teacher per label, or use single-label data"
)


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(
        default=None, metadata={"help": f"A GLUE task from the hub: {', '.join(TASK_TO_KEYS)}."}
    )
    train_file: str | None = field(default=None, metadata={"help": "csv/json with sentence(s) and label."})
    validation_file: str | None = field(default=None, metadata={"help": "csv/json validation file."})
    test_file: str | None = field(default=None, metadata={"help": "csv/json test file (labels give test metrics)."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test set."})

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASK_TO_KEYS:
                raise ValueError(f"Unknown task {self.task_name!r}; choose one of {', '.join(TASK_TO_KEYS)}.")
        elif self.train_file is None or self.validation_file is None:
            raise ValueError("Pass --task_name, or --train_file and --validation_file (csv or json).")
        for split, option in OPTIONS.items():
            path = getattr(self, f"{split}_file")
            if path is not None:
                builder_for(path, option)


def load_raw_datasets(data_args: DataTrainingArguments, cache_dir: str | None) -> DatasetDict:
    """GLUE's ``task_name`` from the hub, or the local files, checked, with their labels encoded (module docstring)."""
    if data_args.task_name is not None:
        return load_dataset("nyu-mll/glue", data_args.task_name, cache_dir=cache_dir)
    paths = {split: getattr(data_args, f"{split}_file") for split in OPTIONS}
    raw = DatasetDict(
        {split: load_file(path, OPTIONS[split], cache_dir) for split, path in paths.items() if path is not None}
    )
    keys = [key for key in text_columns(raw["train"].column_names) or () if key is not None]
    for split, dataset in raw.items():
        where = f"{OPTIONS[split]} {paths[split]}"
        if not keys or not set(keys) <= set(dataset.column_names):
            raise ValueError(
                f"{where}: needs a 'sentence' column, or 'sentence1' and 'sentence2' (the same in every file); "
                f"it has {dataset.column_names}. Rename the text column(s)."
            )
        for key in keys:
            check_text(dataset, key, where)
        if "label" not in dataset.column_names and split != "test":  # a test file without labels: predictions only
            raise ValueError(
                f"{where}: has no 'label' column (columns: {dataset.column_names}). Training and validation files "
                "need one, holding each row's class (or a float, for regression)."
            )
    return encode_labels(raw, {split: f"{OPTIONS[split]} {path}" for split, path in paths.items()})


def builder_for(path: str, option: str) -> str:
    """The ``datasets`` builder that reads ``path`` (given as ``option``), by its extension."""
    builder_name = BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder_name is None:
        raise ValueError(f"{option} {path}: data files must be .csv, .json or .jsonl; save it as one of those.")
    return builder_name


def load_file(path: str, option: str, cache_dir: str | None) -> Dataset:
    """One csv/json/jsonl file as a ``Dataset``, refused if missing, empty, not UTF-8 or unparsable."""
    builder_name = builder_for(path, option)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option} {path} does not exist; check the path.")
    check_utf8(path, option)
    builder = load_dataset_builder(builder_name, data_files={"data": path}, cache_dir=cache_dir)
    try:
        builder.download_and_prepare()
    except DatasetGenerationError as error:  # pandas' or pyarrow's parse error is the cause: keep its words
        raise ValueError(
            f"{option} {path}: cannot be read as {builder_name}: {error.__cause__ or error}. Fix it."
        ) from error
    if not builder.info.splits["data"].num_examples:
        raise ValueError(f"{option} {path}: has no rows (a header alone is not enough); add data rows.")
    return builder.as_dataset("data")


def check_utf8(path: str, option: str) -> None:
    """Line by line, so that the message can say where: pyarrow and pandas name a byte offset or a block."""
    with open(path, "rb") as file:
        number = 0
        for number, line in enumerate(file, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{option} {path}: line {number} is not valid UTF-8 (byte {line[error.start]:#04x} at column "
                    f"{error.start + 1}); re-save the file as UTF-8."
                ) from None
    if number == 0:
        raise ValueError(f"{option} {path}: is empty (0 bytes); add a header and data rows.")


def text_columns(columns: list[str]) -> tuple[str, str | None] | None:
    """The text column(s) of local files, as run_glue.py picks them; None if there are none."""
    if "sentence1" in columns and "sentence2" in columns:
        return "sentence1", "sentence2"
    return ("sentence", None) if "sentence" in columns else None


def first_row(mask: pa.ChunkedArray) -> int | None:
    """The 1-based row of the first True in ``mask``, or None."""
    index = pc.index(mask, True).as_py()
    return None if index < 0 else index + 1


def check_text(dataset: Dataset, name: str, where: str) -> None:
    """Every cell of text column ``name`` holds non-blank text (the tokenizer fails on None, unhelpfully)."""
    column = dataset.data.column(name)
    is_text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
    # pandas reads blank csv cells (and NA, null, ...) as missing; " " stays a string, blank all the same
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(column), ""), True) if is_text else pc.is_null(column)
    row = first_row(blank)
    if row is not None:
        raise ValueError(f"{where}: column '{name}' is empty at row {row}; fill it in or remove the row.")
    if not is_text:
        raise ValueError(f"{where}: column '{name}' holds {dataset.features[name]}, not text; put text in it.")


def label_kind(dataset: Dataset, where: str) -> str:
    """'integer', 'string', 'bool' (classes) or 'float' (regression); refuses null, list or mixed labels."""
    feature = dataset.features["label"]
    if isinstance(feature, (List, LargeList)):
        raise ValueError(f"{where}: 'label' holds lists: {MULTI_LABEL_HELP}.")
    # pandas reads a blank cell of an integer column as NaN: look for nulls before trusting the float dtype
    row = first_row(pc.is_null(dataset.data.column("label"), nan_is_null=True))
    if row is not None:
        raise ValueError(f"{where}: row {row} has no label; fill it in or remove the row.")
    dtype = feature.dtype if isinstance(feature, Value) else ""
    if dtype in ("string", "large_string"):
        return "string"
    if dtype == "bool":
        return "bool"
    if dtype.startswith(("int", "uint")):
        return "integer"
    if dtype.startswith("float"):
        return "float"
    raise ValueError(
        f"{where}: 'label' holds {feature} (values of mixed types?); labels must be all integers or all strings "
        "(classes), or all floats (regression)."
    )


def encode_labels(raw: DatasetDict, where: dict[str, str]) -> DatasetDict:
    """Class labels to ``ClassLabel`` ids in every split, or regression labels to float32; checked across splits."""
    labelled = [split for split in raw if "label" in raw[split].column_names]
    if "test" in labelled and raw["test"].data.column("label").null_count == len(raw["test"]):
        raw["test"] = raw["test"].remove_columns("label")  # a blank label column: predictions only
        labelled.remove("test")
    kinds = {split: label_kind(raw[split], where[split]) for split in labelled}
    for split in labelled:
        # whole numbers in an evaluation file of a regression task are read as integers, and are fine
        if kinds[split] != kinds["train"] and (kinds["train"], kinds[split]) != ("float", "integer"):
            raise ValueError(
                f"{where[split]}: has {kinds[split]} labels but {where['train']} has {kinds['train']} labels; "
                "use the same labels in every file."
            )
    if kinds["train"] == "float":
        return DatasetDict({split: cast_label(raw[split], Value("float32")) for split in raw})
    labels = sorted(raw["train"].unique("label"))
    for split in labelled:
        # GLUE-style test files mark unlabelled rows with -1: run() then skips the test metrics
        unknown = set(raw[split].unique("label")) - set(labels) - ({-1} if split == "test" else set())
        if unknown:
            raise ValueError(
                f"{where[split]}: labels {sorted(unknown)[:20]} do not occur in {where['train']} (its labels: "
                f"{labels[:20]}); correct them or add training rows with them."
            )
    label_to_id = {label: index for index, label in enumerate(labels)}
    feature = ClassLabel(names=[str(label) for label in labels])
    return DatasetDict({split: cast_label(raw[split], feature, label_to_id) for split in raw})


def cast_label(dataset: Dataset, feature, label_to_id: dict | None = None) -> Dataset:
    """``dataset`` with its labels mapped through ``label_to_id`` (-1 stays -1) and typed as ``feature``."""
    if "label" not in dataset.column_names:
        return dataset
    features = dataset.features.copy()
    features["label"] = feature
    if label_to_id is None:
        return dataset.cast(features)

    def encode(batch: dict) -> dict:
        return {"label": [label_to_id.get(label, -1) for label in batch["label"]]}

    # features= types the new ids: map() would otherwise cast them back to the column's old type (string labels)
    return dataset.map(encode, batched=True, features=features, desc="Encoding labels")


def sentence_keys(data_args: DataTrainingArguments, raw: DatasetDict) -> tuple[str, str | None]:
    """The text column(s): GLUE's for ``task_name``, else those :func:`load_raw_datasets` checked."""
    if data_args.task_name is not None:
        return TASK_TO_KEYS[data_args.task_name]
    return text_columns(raw["train"].column_names)


def label_setup(raw: DatasetDict) -> tuple[bool, list | None]:
    """(is_regression, label names or None): GLUE's and local labels alike are ``ClassLabel`` ids or floats."""
    if "label" not in raw["train"].column_names:
        raise ValueError("The training data has no 'label' column.")
    feature = raw["train"].features["label"]
    return (False, feature.names) if isinstance(feature, ClassLabel) else (True, None)
