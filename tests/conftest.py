"""Shared fixtures: a tiny random BERT and calibration batches with padding."""

import pytest
import torch
from transformers import BertConfig

import rmt_kd_hf  # noqa: F401  (registers the Auto classes)


def tiny_bert_config(**overrides) -> BertConfig:
    fields = dict(
        vocab_size=120,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=40,
        num_labels=3,
    )
    fields.update(overrides)
    return BertConfig(**fields)


def make_batches(num_batches: int = 6, batch_size: int = 8, seq_length: int = 16, vocab_size: int = 120, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        input_ids = torch.randint(1, vocab_size, (batch_size, seq_length), generator=generator)
        attention_mask = torch.ones(batch_size, seq_length, dtype=torch.long)
        lengths = torch.randint(seq_length // 2, seq_length + 1, (batch_size,), generator=generator)
        for row, length in enumerate(lengths.tolist()):
            attention_mask[row, length:] = 0
            input_ids[row, length:] = 0
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "labels": torch.randint(0, 3, (batch_size,), generator=generator),
            }
        )
    return batches


@pytest.fixture
def batches():
    return make_batches()


@pytest.fixture
def config():
    return tiny_bert_config()


def logits_of(model, batch):
    model.eval()
    with torch.no_grad():
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if hasattr(output, "logits"):
        return output.logits
    if hasattr(output, "start_logits"):
        return torch.stack([output.start_logits, output.end_logits])
    return output.pooler_output  # base models: the pooler reads the rotated stream back
