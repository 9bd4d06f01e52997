import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertForSequenceClassification,
)

from rmt_kd_hf import RMTBertConfig, RMTBertForSequenceClassification, RMTBertModel, compress_model
from rmt_kd_hf.models.rmt_bert.configuration_rmt_bert import AUTO_MAP, RMT_BERT_FORMAT_VERSION
from rmt_kd_hf.models.rmt_bert.modeling_rmt_bert import RMTLiftedLayerNorm

from ..conftest import logits_of, tiny_bert_config


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    from ..conftest import make_batches

    torch.manual_seed(0)
    batches = make_batches()
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    student, _ = compress_model(teacher, batches, sigma_quantile=0.6, progress=False)
    directory = tmp_path_factory.mktemp("compressed")
    student.save_pretrained(directory)
    return student, batches, str(directory)


def test_lifted_layer_norm_equals_layer_norm_under_rotation():
    torch.manual_seed(0)
    width = 16
    layer_norm = torch.nn.LayerNorm(width, eps=1e-12)
    torch.nn.init.normal_(layer_norm.weight)
    torch.nn.init.normal_(layer_norm.bias)
    rotation_in, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))
    rotation_out, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))
    gamma, beta = layer_norm.weight.double(), layer_norm.bias.double()
    lifted = RMTLiftedLayerNorm(width, width, width, 1e-12).double()
    with torch.no_grad():
        lifted.weight.copy_(rotation_out @ torch.diag(gamma) @ rotation_in.T)
        lifted.mean_direction.copy_(rotation_in @ torch.ones(width, dtype=torch.float64))
        lifted.gain_direction.copy_(rotation_out @ gamma)
        lifted.bias.copy_(rotation_out @ beta)
    x = torch.randn(5, width, dtype=torch.float64) * 3 + 1
    expected = layer_norm.double()(x) @ rotation_out.T
    torch.testing.assert_close(lifted(x @ rotation_in.T), expected, atol=1e-10, rtol=0)


def test_config_round_trip_and_validation():
    config = RMTBertConfig(**tiny_bert_config().to_dict() | {"boundary_sizes": [5, 6, 7, 8, 9]})
    assert config.hidden_size == 9 and config.norm_size == 48
    reloaded = RMTBertConfig.from_dict(json.loads(config.to_json_string()))
    assert reloaded.boundary_sizes == [5, 6, 7, 8, 9] and reloaded.auto_map == AUTO_MAP
    with pytest.raises(ValueError, match="boundary_sizes must have 5 entries"):
        RMTBertConfig(**tiny_bert_config().to_dict() | {"boundary_sizes": [5, 6]})
    with pytest.raises(ValueError, match=">= 1"):
        RMTBertConfig(**tiny_bert_config().to_dict() | {"intermediate_sizes": [0, 4]})
    with pytest.raises(ValueError, match="upgrade rmt-kd-hf"):
        RMTBertConfig(**tiny_bert_config().to_dict() | {"rmt_kd_format_version": RMT_BERT_FORMAT_VERSION + 1})


def test_save_writes_safetensors_modeling_files_and_auto_map(compressed):
    _, _, directory = compressed
    files = set(os.listdir(directory))
    assert {"config.json", "model.safetensors", "modeling_rmt_bert.py", "configuration_rmt_bert.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    saved = json.load(open(os.path.join(directory, "config.json")))
    assert saved["model_type"] == "rmt_bert" and saved["auto_map"] == AUTO_MAP


def test_auto_classes_load_the_checkpoint_with_identical_logits(compressed):
    student, batches, directory = compressed
    assert isinstance(AutoConfig.from_pretrained(directory), RMTBertConfig)
    reloaded = AutoModelForSequenceClassification.from_pretrained(directory)
    assert isinstance(reloaded, RMTBertForSequenceClassification)
    for batch in batches[:2]:
        assert torch.equal(logits_of(reloaded, batch), logits_of(student, batch))
    base = AutoModel.from_pretrained(directory)
    assert isinstance(base, RMTBertModel)
    assert torch.equal(base.pooler.dense.weight, student.bert.pooler.dense.weight)


@pytest.mark.parametrize("auto_class", [AutoModelForTokenClassification, AutoModelForQuestionAnswering])
def test_other_heads_are_registered(compressed, auto_class, tmp_path):
    _, batches, directory = compressed
    model = auto_class.from_pretrained(
        directory, num_labels=2, ignore_mismatched_sizes=True
    )  # head weights are new, the encoder is loaded
    assert type(model).__name__.startswith("RMTBertFor")
    model.save_pretrained(tmp_path)
    again = auto_class.from_pretrained(tmp_path)
    torch.testing.assert_close(logits_of(again, batches[0]), logits_of(model, batches[0]), atol=0, rtol=0)


def test_trust_remote_code_loads_without_the_package(compressed, tmp_path):
    student, batches, directory = compressed
    batch = batches[0]
    torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, tmp_path / "inputs.pt")
    script = f"""
import sys
sys.modules["rmt_kd_hf"] = None  # any import of the package now fails
import torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained({directory!r}, trust_remote_code=True).eval()
assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
inputs = torch.load({str(tmp_path / "inputs.pt")!r})
with torch.no_grad():
    torch.save(model(**inputs).logits, {str(tmp_path / "logits.pt")!r})
"""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), logits_of(student, batch))


def test_forward_options(compressed):
    student, batches, _ = compressed
    batch = batches[0]
    with torch.no_grad():
        output = student(
            **{k: batch[k] for k in ("input_ids", "attention_mask")},
            labels=batch["labels"],
            output_hidden_states=True,
            output_attentions=True,
        )
        tuple_output = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=False)
    assert output.loss is not None and torch.isfinite(output.loss)
    widths = student.config.boundary_sizes
    assert [h.shape[-1] for h in output.hidden_states] == widths[::2]
    assert len(output.attentions) == 2 and output.attentions[0].shape == (8, 4, 16, 16)
    # The eager path (attentions requested) and the SDPA path agree.
    torch.testing.assert_close(tuple_output[0], output.logits, atol=1e-5, rtol=0)
