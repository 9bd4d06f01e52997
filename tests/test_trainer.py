import json
import os

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    TrainerCallback,
    default_data_collator,
)

from rmt_kd_hf import RMTKDConfig, RMTKDTrainer, compress_model
from rmt_kd_hf.filenames import HISTORY_FILENAME
from rmt_kd_hf.losses import distillation_loss, hidden_state_loss
from rmt_kd_hf.surgery.bert import BertSurgery

from .conftest import make_trainer, tiny_bert_config


def test_distillation_loss_matches_a_hand_computation():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    labels = torch.tensor([0, 2])
    alpha, temperature = 0.7, 2.0
    ce = np.mean(
        [-np.log(np.exp(s[y]) / np.exp(s).sum()) for s, y in zip(student.numpy(), labels.numpy(), strict=True)]
    )
    kl = 0.0
    for s, t in zip(student.numpy() / temperature, teacher.numpy() / temperature, strict=True):
        p_old, p_new = np.exp(t) / np.exp(t).sum(), np.exp(s) / np.exp(s).sum()
        kl += np.sum(p_old * np.log(p_old / p_new))
    expected = alpha * ce + (1 - alpha) * temperature**2 * kl / 2
    actual = distillation_loss(student, teacher, labels, alpha, temperature)
    assert actual.item() == pytest.approx(expected, rel=1e-6)
    # alpha = 1 is plain cross-entropy; identical logits make the KL term vanish
    assert distillation_loss(student, student, labels, 0.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_loss_ignores_padding_labels_and_handles_regression():
    student, teacher = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    labels = torch.tensor([[0, 1, -100, -100], [2, -100, -100, 1]])
    keep = labels.reshape(-1) != -100
    expected = distillation_loss(student.reshape(-1, 3)[keep], teacher.reshape(-1, 3)[keep], labels.reshape(-1)[keep])
    assert distillation_loss(student, teacher, labels).item() == pytest.approx(expected.item())
    student_r, teacher_r, target = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [2.0]]), torch.tensor([1.0, 1.0])
    assert distillation_loss(student_r, teacher_r, target, 0.5).item() == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("run")
    trainer = make_trainer(tmp_path, sigma_quantile=0.6, max_metric_drop=0.5)
    trainer.train()  # fine-tune the teacher first
    teacher_parameters = sum(p.numel() for p in trainer.model.parameters())
    model = trainer.compress()
    return trainer, model, teacher_parameters


def test_compress_accepts_a_stage_saves_a_loadable_model_and_history(trained_run):
    trainer, model, teacher_parameters = trained_run
    output_dir = trainer.args.output_dir
    history = json.load(open(os.path.join(output_dir, HISTORY_FILENAME)))
    assert history["stages"][0]["status"] == "accepted"
    stage = history["stages"][0]
    assert set(stage["sites"]) == {"embeddings", *[f"boundary.{b}" for b in range(5)], "ffn.0", "ffn.1"}
    assert stage["num_parameters"] < teacher_parameters == history["teacher"]["num_parameters"]
    assert len(history["calibration"]["row_ids_sha256"]) == 64 and history["calibration"]["num_rows"] == 32
    reloaded = AutoModelForSequenceClassification.from_pretrained(output_dir)
    batch = default_data_collator([trainer.eval_dataset[i] for i in range(8)])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, model.eval()(**batch).logits)


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="sigma_quantile must be in"):
        RMTKDConfig(output_dir=str(tmp_path), sigma_quantile=1.5)
    with pytest.raises(ValueError, match="distillation_alpha"):
        RMTKDConfig(output_dir=str(tmp_path), distillation_alpha=-0.1)
    with pytest.raises(ValueError, match=r"unknown kinds of site \['fnn'\]: use some of"):
        RMTKDConfig(output_dir=str(tmp_path), sigma_quantile_shifts={"fnn": 0.2})
    with pytest.raises(ValueError, match=r"sigma_quantile_shifts\['ffn'\] must be a number in \(-1, 1\)"):
        RMTKDConfig(output_dir=str(tmp_path), sigma_quantile_shifts='{"ffn": 1.5}')
    with pytest.raises(ValueError, match="must be a dict or its JSON string"):
        RMTKDConfig(output_dir=str(tmp_path), sigma_quantile_shifts="ffn=0.2")
    with pytest.raises(TypeError, match="RMTKDConfig"):
        from transformers import TrainingArguments

        RMTKDTrainer(BertForSequenceClassification(tiny_bert_config()), TrainingArguments(output_dir=str(tmp_path)))


def test_too_few_calibration_samples_warn(batches, caplog):
    from rmt_kd_hf import compress_model

    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    four_tokens = {key: value[:1, :4] for key, value in batches[0].items() if key != "labels"}
    with caplog.at_level("WARNING"):
        compress_model(teacher, [four_tokens], keep_all=True, progress=False)  # 4 samples, 48 dimensions
    assert "4 calibration samples for 48 dimensions (n < d)" in caplog.text


def test_trainer_checkpoints_hold_no_pickles_and_resume_without_unpickling(tmp_path, monkeypatch):
    import pickle

    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=4, max_steps=8)
    trainer.train()
    reference = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    checkpoint = tmp_path / "out" / "checkpoint-4"
    names = set(os.listdir(checkpoint))
    assert {"model.safetensors", "optimizer.safetensors", "scheduler.json", "rng_state.safetensors"} <= names
    assert "training_args.json" in names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth"))]

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    resumed = make_trainer(tmp_path, save_strategy="steps", save_steps=4, max_steps=8)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6)


def test_attention_heads_and_width_multiple_through_the_trainer(tmp_path):
    trainer = make_trainer(
        tmp_path, reduce_attention_heads=True, width_multiple=8, stage_max_steps=2, max_metric_drop=1.0
    )
    model = trainer.compress()
    config = model.config
    head_size = 48 // 4
    assert max(config.query_key_head_sizes) < head_size or max(config.value_head_sizes) < head_size
    assert all(width % 8 == 0 for width in config.boundary_sizes + config.intermediate_sizes)
    assert trainer.compression_history["config"]["reduce_attention_heads"] is True
    reloaded = AutoModelForSequenceClassification.from_pretrained(trainer.args.output_dir)
    batch = default_data_collator([trainer.eval_dataset[i] for i in range(8)])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, model.eval()(**batch).logits)


def test_hidden_state_loss_matches_a_hand_computation_and_skips_padding():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 3, 5), torch.randn(2, 3, 5)]
    bases = [torch.linalg.qr(torch.randn(5, 5))[0][:4], torch.eye(5)]
    student = [teacher[0] @ bases[0].T + 0.1, teacher[1]]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    real = mask.bool()
    target = (teacher[0] @ bases[0].T)[real]
    expected_first = ((student[0][real] - target) ** 2).sum() / (target**2).sum()
    actual = hidden_state_loss(student, teacher, bases, mask)
    assert actual.item() == pytest.approx(expected_first.item() / 2, rel=1e-6)  # the second layer matches exactly
    student[0][~real] = 1e6  # padding never counts
    assert hidden_state_loss(student, teacher, bases, mask).item() == pytest.approx(actual.item(), rel=1e-6)


def test_hidden_state_bases_map_the_teacher_into_the_compressed_coordinates(batches):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    surgery = BertSurgery()
    prepared = surgery.prepare(teacher)
    batch = {key: batches[0][key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        old = prepared(**batch, output_hidden_states=True).hidden_states
    for keep_all, bound in ((True, 1e-10), (False, 0.5)):
        student, report = compress_model(teacher, batches, sigma_quantile=0.6, keep_all=keep_all, progress=False)
        bases = [basis.float() for basis in surgery.hidden_state_bases(prepared, report.analyses)]
        with torch.no_grad():
            new = student(**batch, output_hidden_states=True).hidden_states
        assert [state.shape[-1] for state in new] == [basis.shape[0] for basis in bases]
        loss = hidden_state_loss(new, old, bases, batch["attention_mask"]).item()
        assert loss < bound
        shuffled = [basis[torch.randperm(basis.shape[0])] for basis in bases]
        assert hidden_state_loss(new, old, shuffled, batch["attention_mask"]).item() > max(loss, 1e-3)


def test_hidden_state_distillation_through_the_trainer(tmp_path, monkeypatch):
    import rmt_kd_hf.trainer as trainer_module

    recorded = []

    def recording_loss(*args, **kwargs):
        value = hidden_state_loss(*args, **kwargs)
        recorded.append(value.item())
        return value

    monkeypatch.setattr(trainer_module, "hidden_state_loss", recording_loss)
    make_trainer(tmp_path / "off", hidden_distillation_weight=0.0, stage_max_steps=4, max_metric_drop=1.0).compress()
    assert recorded == []
    trainer = make_trainer(tmp_path, stage_max_steps=20, max_metric_drop=1.0)  # default: on (1.0) for BERT
    trainer.compress()
    assert len(recorded) == 20
    assert np.mean(recorded[-5:]) < np.mean(recorded[:5])
    assert trainer.compression_history["config"]["hidden_distillation_weight"] == 1.0


def test_hidden_state_distillation_is_refused_for_resnets_and_off_by_default_there(tmp_path):
    from .resnet_fixtures import tiny_resnet

    with pytest.raises(ValueError, match="hidden_distillation_weight=1.0.*BERT encoders only"):
        RMTKDTrainer(
            model=tiny_resnet(),
            args=RMTKDConfig(output_dir=str(tmp_path), hidden_distillation_weight=1.0, use_cpu=True, report_to=[]),
        )
    default = RMTKDTrainer(model=tiny_resnet(), args=RMTKDConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    assert default.hidden_distillation_weight == 0.0  # the default turns it on only where it exists


class _WeightsAtEvaluation(TrainerCallback):
    def __init__(self):
        self.states = []  # (global step, weights) per evaluation

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.states.append((state.global_step, {name: tensor.clone() for name, tensor in model.state_dict().items()}))


def test_load_best_model_at_end_keeps_each_stages_best_weights(tmp_path):
    scores = iter([0.9, 0.3, 0.8, 0.4, 0.8])  # teacher, steps 2 / 4 / 6 of the stage, then the stage's final check

    def scripted_metric(_):
        return {"accuracy": next(scores)}

    snapshots = _WeightsAtEvaluation()
    best_fields = dict(eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2)
    trainer = make_trainer(
        tmp_path,
        compute_metrics=scripted_metric,
        callbacks=[snapshots],
        stage_max_steps=6,
        max_metric_drop=1.0,
        measure_latency=False,
        screening_fraction=0.0,  # the scripted scores are those of the stage's own evaluations
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        **best_fields,
    )
    model = trainer.compress()
    stage = trainer.compression_history["stages"][0]
    assert stage["kept_step"] == 4 and stage["eval_accuracy"] == 0.8
    assert [step for step, _ in snapshots.states] == [0, 2, 4, 6, 6]
    final = model.state_dict()
    assert all(torch.equal(final[name], tensor) for name, tensor in snapshots.states[2][1].items())  # step 4
    assert not all(torch.equal(final[name], tensor) for name, tensor in snapshots.states[3][1].items())  # step 6
    assert not os.path.exists(os.path.join(trainer.args.output_dir, "checkpoint-2"))  # nothing saved mid-stage
    trainer.create_model_card(model_name="tiny-best-of-stage")
    with open(os.path.join(trainer.args.output_dir, "README.md")) as card:
        assert "Distilled weights kept from step 4, the best on the validation set" in card.read()
    assert not any(type(callback).__name__ == "BestStageWeights" for callback in trainer.callback_handler.callbacks)

    without = make_trainer(tmp_path / "last", stage_max_steps=6, max_metric_drop=1.0, measure_latency=False)
    without.compress()
    assert "kept_step" not in without.compression_history["stages"][0]
