"""Vocabulary trimming inside ``RMTKDTrainer.compress()`` (``trim_vocabulary``)."""

import json
import os
import random

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    BertTokenizerFast,
    DataCollatorWithPadding,
)

from rmt_kd_hf import RMTKDConfig, RMTKDTrainer
from rmt_kd_hf.filenames import HISTORY_FILENAME
from rmt_kd_hf.hub import write_model_card

from .conftest import QUIET_CPU_ARGS, accuracy, tiny_bert_config
from .test_vocabulary import VOCABULARY

TRAIN_WORDS = ["a", "film", "playing", "quiet", "quietly", "great", "movie", "the", "plays"]
UNSEEN = ["dull", "zebra", "playful"]  # in the tokenizer, never in the training text


def sentences(num_rows: int, seed: int, words: list[str]) -> Dataset:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(num_rows):
        text = [rng.choice(words) for _ in range(rng.randint(3, 8))]
        labels.append(int("great" in text))
        texts.append(" ".join(text))
    return Dataset.from_dict({"sentence": texts, "label": labels})


@pytest.fixture
def tokenizer():
    return BertTokenizerFast(vocab={token: index for index, token in enumerate(VOCABULARY)})


def make_text_trainer(tmp_path, tokenizer, processing_class="same", **overrides) -> RMTKDTrainer:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(vocab_size=len(VOCABULARY), num_labels=2))
    tokenize = lambda batch: tokenizer(batch["sentence"])  # noqa: E731
    train = sentences(240, 0, TRAIN_WORDS).map(tokenize, batched=True, remove_columns=["sentence"])
    validation = sentences(64, 1, TRAIN_WORDS + UNSEEN).map(tokenize, batched=True, remove_columns=["sentence"])
    fields = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=3e-3,
        stage_max_steps=4,
        max_metric_drop=1.0,
        sigma_quantile=0.3,
        min_width=2,
        measure_latency=False,
        **QUIET_CPU_ARGS,
    )
    fields.update(overrides)
    return RMTKDTrainer(
        model=model,
        args=RMTKDConfig(**fields),
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer if processing_class == "same" else processing_class,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )


def test_compress_trims_the_vocabulary_and_saves_a_matching_tokenizer(tmp_path, tokenizer):
    trainer = make_text_trainer(tmp_path, tokenizer)
    model = trainer.compress().eval()
    used = {token_id for ids in trainer.train_dataset["input_ids"] for token_id in ids}
    history = json.load(open(os.path.join(tmp_path, HISTORY_FILENAME)))
    assert history["vocabulary"] == {
        "teacher_size": len(VOCABULARY),
        "kept_size": model.config.vocab_size,
        "eval_accuracy": history["vocabulary"]["eval_accuracy"],  # the trim alone, judged like a stage
        "paired_standard_error": history["vocabulary"]["paired_standard_error"],  # against the teacher's rows
    }
    assert history["vocabulary"]["paired_standard_error"] >= 0
    assert len(used) <= model.config.vocab_size < len(VOCABULARY)

    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert len(reloaded_tokenizer) == reloaded.config.vocab_size == model.config.vocab_size
    # end to end from the saved files = the trainer's model fed the original ids through its collator
    texts = ["the quiet film", "a great movie plays", "quietly playing"]
    original_ids = [tokenizer(text) for text in texts]
    batch = trainer.data_collator([{key: row[key] for key in ("input_ids", "attention_mask")} for row in original_ids])
    encoded = reloaded_tokenizer(texts, padding=True, return_tensors="pt")
    assert encoded["input_ids"].tolist() == batch["input_ids"].tolist()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        actual = reloaded(**encoded).logits
    torch.testing.assert_close(actual, expected)
    # unseen words fall back to [UNK]; evaluation on original-id datasets still works after compress()
    assert reloaded_tokenizer.tokenize("a zebra film") == ["a", "[UNK]", "film"]
    assert 0.0 <= trainer.evaluate()["eval_accuracy"] <= 1.0
    card = write_model_card(tmp_path, plots=False)
    row = f"| vocabulary (tokens) | {len(VOCABULARY)} | {model.config.vocab_size} (accuracy "
    assert row in card.content and "with the trim alone) |" in card.content


def test_trim_vocabulary_false_keeps_the_teacher_vocabulary(tmp_path, tokenizer):
    model = make_text_trainer(tmp_path, tokenizer, trim_vocabulary=False).compress()
    assert model.config.vocab_size == len(VOCABULARY)
    assert len(AutoTokenizer.from_pretrained(tmp_path)) == len(tokenizer)
    assert "vocabulary" not in json.load(open(os.path.join(tmp_path, HISTORY_FILENAME)))


def test_trimming_needs_a_tokenizer_only_when_asked_for(tmp_path, tokenizer):
    model = make_text_trainer(tmp_path / "auto", tokenizer, processing_class=None).compress()
    assert model.config.vocab_size == len(VOCABULARY)  # nothing to save a trimmed tokenizer as: left alone
    trainer = make_text_trainer(tmp_path / "asked", tokenizer, processing_class=None, trim_vocabulary=True)
    with pytest.raises(ValueError, match="trim_vocabulary=True, but the trainer has no fast tokenizer"):
        trainer.compress()


def test_resuming_a_trimmed_run_gives_the_uninterrupted_result(tmp_path, tokenizer):
    settings = dict(compression_schedule="per_layer", stage_max_steps=2)
    reference = make_text_trainer(tmp_path / "full", tokenizer, **settings).compress()
    stage_0 = os.path.join(tmp_path, "full", "checkpoint-stage-0")
    assert len(AutoTokenizer.from_pretrained(stage_0)) == reference.config.vocab_size
    resumed = make_text_trainer(tmp_path / "full", tokenizer, **settings).compress(resume_from_checkpoint=stage_0)
    settings_of = lambda model: {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert settings_of(resumed) == settings_of(reference)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_a_trim_that_alone_breaks_the_floor_is_undone(tmp_path, tokenizer):
    holder = {}

    def worse_when_trimmed(_):
        return {"accuracy": 0.5 if holder["trainer"].model.config.vocab_size < len(VOCABULARY) else 0.9}

    trainer = make_text_trainer(tmp_path, tokenizer, max_metric_drop=0.1, stage_max_steps=1)
    trainer.compute_metrics = worse_when_trimmed
    holder["trainer"] = trainer
    model = trainer.compress()
    history = trainer.compression_history
    assert history["vocabulary"]["undone"] == "accuracy 0.5000 < floor 0.8000"
    assert history["vocabulary"]["eval_accuracy"] == 0.5
    assert model.config.vocab_size == len(VOCABULARY) and trainer.processing_class is tokenizer
    assert AutoTokenizer.from_pretrained(tmp_path).vocab_size == tokenizer.vocab_size  # the teacher's tokenizer
    trainer.create_model_card()
    assert "was undone: accuracy 0.5000 < floor 0.8000" in (tmp_path / "README.md").read_text()
