"""The post-LayerNorm encoder families beside BERT (RoBERTa, XLM-RoBERTa, ELECTRA), each on a tiny random model built
from transformers' own config class: exact conversion, save/load through the Auto classes and through
``trust_remote_code`` without the package, and compression end to end."""

import json
import os

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification

import rmt_kd_hf
from rmt_kd_hf import compress_model
from rmt_kd_hf.surgery import get_surgery

from ..conftest import (
    FAMILIES,
    HEADS,
    TEACHER_PREFIX,
    cli_compress,
    family_teacher,
    logits_of,
    logits_without_the_package,
    make_trainer,
    save_cli_teacher,
    tiny_csv_files,
)


def outputs_of(model, batch) -> torch.Tensor:
    if model.base_model is model and getattr(model, "pooler", None) is None:  # no pooler to read back
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    return logits_of(model, batch)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_direction_reproduces_the_teacher(family, head, batches):
    teacher = family_teacher(family, head)
    converted = get_surgery(teacher).prepare(teacher)
    assert type(converted).__name__ == f"RMT{TEACHER_PREFIX[family]}{head}"
    for batch in batches[:2]:
        torch.testing.assert_close(outputs_of(converted, batch), outputs_of(teacher, batch), atol=1e-5, rtol=0)
    if head == "Model" and family in ("electra", "distilbert"):
        return  # its hidden states come back rotated: no pooler reads them back to compare
    student, _ = compress_model(teacher, batches, keep_all=True, progress=False)
    for batch in batches[:3]:
        torch.testing.assert_close(outputs_of(student, batch), outputs_of(teacher, batch), atol=1e-5, rtol=0)


def test_roberta_positions_count_only_the_tokens_that_are_not_padding(batches):
    teacher = family_teacher("roberta")
    student = get_surgery(teacher).prepare(teacher)
    batch = batches[0]
    padded = batch["attention_mask"].eq(0).any(dim=1)
    assert padded.any()  # the comparison covers padded rows
    wrong_positions = torch.arange(batch["input_ids"].shape[1])[None].expand_as(batch["input_ids"])
    with torch.no_grad():
        ordinary = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shifted = student(**{k: batch[k] for k in ("input_ids", "attention_mask")}, position_ids=wrong_positions)
    assert not torch.allclose(ordinary, shifted.logits)  # the padding offset is what makes it exact


@pytest.fixture(scope="module", params=list(FAMILIES))
def compressed_family(request, tmp_path_factory):
    from ..conftest import make_batches

    batches = make_batches()
    teacher = family_teacher(request.param)
    student, report = compress_model(teacher, batches, sigma_quantile=0.6, progress=False)
    directory = tmp_path_factory.mktemp(f"compressed_{request.param}")
    student.save_pretrained(directory)
    return request.param, student, report, batches, str(directory)


def test_a_compressed_family_model_is_smaller_and_loads_back_identically(compressed_family):
    family, student, report, batches, directory = compressed_family
    assert report.num_parameters_after < report.num_parameters_before
    config = json.loads(open(os.path.join(directory, "config.json")).read())
    assert config["model_type"] == FAMILIES[family][2]
    assert config["auto_map"]["AutoModelForSequenceClassification"].startswith("modeling_rmt_bert.RMT")
    assert AutoConfig.from_pretrained(directory).model_type == FAMILIES[family][2]
    loaded = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    assert type(loaded) is type(student)
    for batch in batches[:2]:
        torch.testing.assert_close(logits_of(loaded, batch), logits_of(student, batch), atol=0, rtol=0)


def test_a_compressed_family_model_loads_with_trust_remote_code_without_the_package(compressed_family, tmp_path):
    _, student, _, batches, directory = compressed_family
    logits = logits_without_the_package(directory, batches[0], tmp_path, type(student).__name__)
    assert torch.equal(logits, logits_of(student, batches[0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_trainer_compresses_each_family_end_to_end(family, tmp_path):
    teacher = family_teacher(family, num_labels=2)
    trainer = make_trainer(tmp_path, model=teacher, stage_max_steps=2, max_metric_drop=1.0, stage_retries=0)
    model = trainer.compress()
    history = trainer.compression_history
    assert history["stages"][0]["status"] == "accepted"
    assert type(model).__name__ == f"RMT{TEACHER_PREFIX[family]}ForSequenceClassification"
    assert history["final"]["num_parameters"] < history["teacher"]["num_parameters"]
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert type(loaded) is type(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_command_line_compresses_each_family(family, tmp_path):
    teacher = save_cli_teacher(family_teacher(family, num_labels=2), tmp_path / "teacher")
    # tiny random models can have a pure-noise boundary (k = 0, refused): keep at least 4 directions
    assert cli_compress(teacher, tiny_csv_files(tmp_path), tmp_path / "out", "--do_eval", "--min_width=4") == 0
    history = json.loads((tmp_path / "out" / "rmt_kd_history.json").read_text())
    assert AutoConfig.from_pretrained(tmp_path / "out").model_type == FAMILIES[family][2]
    assert history["final"]["num_parameters"] < history["teacher"]["num_parameters"]
    if family in ("roberta", "xlm_roberta"):  # positions count from the padding id: never trimmed
        assert history.get("vocabulary") is None
    else:  # trimmed (ELECTRA: with its projection folded into the LayerNorm)
        assert history["vocabulary"]["kept_size"] < history["vocabulary"]["teacher_size"]


def test_an_unsupported_architecture_names_the_supported_families():
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match="GPT2Model.*BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT"):
        get_surgery(transformers.GPT2Model(config))
    assert rmt_kd_hf.RMTElectraConfig.model_type == "rmt_electra"


@pytest.mark.parametrize("family", FAMILIES)
def test_per_head_attention_and_a_factored_word_table_keep_every_family_exact_at_full_width(family, batches):
    teacher = family_teacher(family)
    options = {"reduce_attention_heads": True, "factorize_word_embeddings": True}
    student, report = compress_model(teacher, batches, keep_all=True, progress=False, surgery_options=options)
    assert {"attention.0.query_key", "attention.1.value", "word_embeddings"} <= set(report.kept_widths)
    for batch in batches[:3]:
        torch.testing.assert_close(logits_of(student, batch), logits_of(teacher, batch), atol=1e-5, rtol=0)


def test_deberta_is_refused_with_the_list_of_supported_families():
    config = transformers.DebertaV2Config(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    with pytest.raises(ValueError, match="no surgery for DebertaV2ForSequenceClassification. Supported: the encoders"):
        get_surgery(transformers.DebertaV2ForSequenceClassification(config))
