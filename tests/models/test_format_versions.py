import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from rmt_kd_hf import RMTBertConfig, RMTBertForSequenceClassification, compress_model
from rmt_kd_hf.models.rmt_bert.configuration_rmt_bert import RMT_BERT_FORMAT_VERSION
from rmt_kd_hf.models.rmt_bert.modeling_rmt_bert import RMTLiftedLayerNorm

from ..conftest import logits_of, tiny_bert_config


def format_1_copy(teacher: BertForSequenceClassification) -> RMTBertForSequenceClassification:
    """The teacher as a format-1 RMTBert model (uncentred LayerNorm weight plus gain_direction)."""
    fields = {k: v for k, v in teacher.config.to_dict().items() if k not in ("model_type", "architectures")}
    model = RMTBertForSequenceClassification(RMTBertConfig(**fields, rmt_kd_format_version=1)).eval()
    state = {}
    for name, tensor in teacher.state_dict().items():
        if ".LayerNorm." in name and name.endswith(".weight"):
            prefix = name.rsplit(".", 1)[0]
            state[name] = torch.diag(tensor)
            state[f"{prefix}.gain_direction"] = tensor.clone()
            state[f"{prefix}.mean_direction"] = torch.ones_like(tensor)
        else:
            state[name] = tensor
    model.load_state_dict(state, strict=False)
    return model


def test_centred_lifted_layer_norm_equals_layer_norm_under_rotation():
    torch.manual_seed(0)
    width, kept = 16, 16
    gamma, beta = torch.randn(width, dtype=torch.float64), torch.randn(width, dtype=torch.float64)
    rotation_in, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))
    rotation_out, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))
    lifted = RMTLiftedLayerNorm(kept, kept, width, 1e-12, centred=True).double()
    centring = torch.eye(width, dtype=torch.float64) - 1.0 / width
    with torch.no_grad():
        lifted.weight.copy_(rotation_out @ torch.diag(gamma) @ centring @ rotation_in.T)
        lifted.mean_direction.copy_(rotation_in @ torch.ones(width, dtype=torch.float64))
        lifted.bias.copy_(rotation_out @ beta)
    assert not hasattr(lifted, "gain_direction")
    x = torch.randn(5, width, dtype=torch.float64) * 3 + 1
    expected = torch.nn.functional.layer_norm(x, (width,), gamma, beta, eps=1e-12) @ rotation_out.T
    torch.testing.assert_close(lifted(x @ rotation_in.T), expected, atol=1e-10, rtol=0)


def test_format_1_checkpoints_still_load_and_compress_into_the_current_format(batches, tmp_path):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    old = format_1_copy(teacher)
    assert hasattr(old.bert.embeddings.LayerNorm, "gain_direction")
    torch.testing.assert_close(logits_of(old, batches[0]), logits_of(teacher, batches[0]), atol=1e-6, rtol=0)
    old.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.config.rmt_kd_format_version == 1
    assert torch.equal(logits_of(reloaded, batches[0]), logits_of(old, batches[0]))
    current, _ = compress_model(reloaded, batches, keep_all=True, progress=False)
    assert current.config.rmt_kd_format_version == RMT_BERT_FORMAT_VERSION
    assert not hasattr(current.bert.embeddings.LayerNorm, "gain_direction")
    torch.testing.assert_close(logits_of(current, batches[1]), logits_of(teacher, batches[1]), atol=1e-5, rtol=0)


def test_format_2_features_need_format_2():
    with pytest.raises(ValueError, match="word_embedding_rank needs rmt_kd_format_version >= 2"):
        RMTBertConfig(**tiny_bert_config().to_dict() | {"rmt_kd_format_version": 1, "word_embedding_rank": 3})


def test_fused_projection_without_autograd_follows_weight_updates(batches):
    torch.manual_seed(1)
    model = compress_model(BertForSequenceClassification(tiny_bert_config()).eval(), batches, progress=False)[0]
    inputs = {"input_ids": batches[0]["input_ids"], "attention_mask": batches[0]["attention_mask"]}
    with torch.enable_grad():
        expected = model(**inputs).logits.detach()
    with torch.inference_mode():
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.value.weight.mul_(0.5)  # an optimiser step, in place
        with torch.enable_grad():
            changed = model(**inputs).logits.detach()
        assert not torch.allclose(changed, expected)
        torch.testing.assert_close(model(**inputs).logits, changed, atol=1e-6, rtol=0)


def test_fused_projection_follows_a_fused_optimiser_between_evaluations(batches):
    """Fused AdamW (Trainer's default) updates weights without bumping ``_version``; evaluating between training
    steps, as ``eval_strategy="steps"`` does, must still see the new weights."""
    torch.manual_seed(2)
    model = compress_model(BertForSequenceClassification(tiny_bert_config()).eval(), batches, progress=False)[0]
    inputs = {"input_ids": batches[0]["input_ids"], "attention_mask": batches[0]["attention_mask"]}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    with torch.no_grad():
        before = model.eval()(**inputs).logits  # builds the fused cache
    model.train()
    model(**inputs, labels=batches[0]["labels"]).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(**inputs).logits
    with torch.enable_grad():
        unfused = model(**inputs).logits.detach()
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, unfused, atol=1e-6, rtol=0)


def test_fused_projection_follows_edits_through_data(batches):
    """``.data`` edits bump no version counter: the inference path must still read the current weights."""
    torch.manual_seed(3)
    model = compress_model(BertForSequenceClassification(tiny_bert_config()).eval(), batches, progress=False)[0]
    inputs = {"input_ids": batches[0]["input_ids"], "attention_mask": batches[0]["attention_mask"]}
    with torch.no_grad():
        before = model(**inputs).logits
        model.bert.encoder.layer[0].attention.self.query.weight.data.mul_(3.0)
        after = model(**inputs).logits
    with torch.enable_grad():
        unfused = model(**inputs).logits.detach()
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, unfused, atol=1e-6, rtol=0)
