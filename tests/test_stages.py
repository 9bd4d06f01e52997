"""A stage judged against the floor (``rmt_kd_hf.stages``): roll-back, milder retries, the accuracy target's stronger
cuts, screening, nothing left to cut, and the parameter-budget plans, run through ``RMTKDTrainer.compress``."""

import json

import pytest
import torch
from transformers import BertForSequenceClassification, TrainerCallback, default_data_collator

from rmt_kd_hf.history import RunHistory
from rmt_kd_hf.stages import stage_schedule
from rmt_kd_hf.surgery.base import count_parameters
from rmt_kd_hf.surgery.bert import BertSurgery

from .conftest import make_trainer, tiny_bert_config


def test_the_stage_schedule_is_one_stage_for_one_shot_and_each_boundary_in_order_per_layer():
    surgery = BertSurgery()
    model = surgery.prepare(BertForSequenceClassification(tiny_bert_config()).eval())
    per_layer = stage_schedule(surgery, model, "per_layer", "shallow_to_deep")
    assert stage_schedule(surgery, model, "one_shot", "shallow_to_deep") == [None]
    assert per_layer == surgery.stages(model) and len(per_layer) == 3
    assert per_layer[0] == ["embeddings", "boundary.0"]
    assert stage_schedule(surgery, model, "per_layer", "deep_to_shallow") == per_layer[::-1]


def test_a_stage_below_the_floor_is_rolled_back(tmp_path):
    values = iter([0.9, 0.5])  # teacher, then the compressed candidate

    def falling_metric(_):
        return {"accuracy": next(values)}

    trainer = make_trainer(
        tmp_path, compute_metrics=falling_metric, max_metric_drop=0.01, stage_max_steps=2, stage_retries=0
    )
    teacher = trainer.model
    model = trainer.compress()
    history = trainer.compression_history
    assert history["stages"][0]["status"].startswith("rolled back")
    assert model.config.boundary_sizes == [48] * 5  # the teacher's widths, in its RMT form
    trainer.create_model_card()  # no stage kept, no spectra to plot: still a card
    assert "rolled back" in (tmp_path / "out" / "README.md").read_text()
    batch = default_data_collator([trainer.eval_dataset[i] for i in range(4)])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, teacher.eval()(**batch).logits, atol=1e-5, rtol=0)


def test_a_rolled_back_stage_is_retried_milder_and_keeps_the_strongest_cut_that_passes(tmp_path):
    holder = {}

    def size_dependent_metric(_):  # cuts that keep more than 60% of the teacher's parameters pass the floor
        kept = count_parameters(holder["trainer"].model) / holder["teacher_parameters"]
        return {"accuracy": 0.9 if kept > 0.6 else 0.5}

    trainer = make_trainer(tmp_path, compute_metrics=size_dependent_metric, stage_max_steps=1, stage_retries=4)
    holder.update(trainer=trainer, teacher_parameters=count_parameters(trainer.model))
    model = trainer.compress()
    stage = trainer.compression_history["stages"][0]
    tries = stage["tries"]
    assert stage["status"] == "accepted" and len(tries) == 5
    assert tries[0]["sigma_quantile"] == 0.5 and tries[0]["status"].startswith("rolled back: accuracy 0.5000")
    quantiles = [entry["sigma_quantile"] for entry in tries]
    assert quantiles[1] == 0.25 and all(0 < quantile < 0.5 for quantile in quantiles[1:])
    accepted = [entry for entry in tries if entry["status"] == "accepted"]
    assert accepted and stage["num_parameters"] == min(entry["num_parameters"] for entry in accepted)
    assert stage["sigma_quantile"] == max(entry["sigma_quantile"] for entry in accepted)  # the strongest that passed
    assert count_parameters(model) == stage["num_parameters"] > 0.6 * holder["teacher_parameters"]
    assert json.loads((tmp_path / "out" / "rmt_kd_history.json").read_text())["stages"][0]["tries"] == tries
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Cuts tried (a rolled-back cut is retried with a milder σ² quantile): quantile 0.5: rolled back" in card


def test_the_accuracy_target_searches_stronger_cuts_after_one_that_passes(tmp_path):
    holder = {}

    def size_dependent_metric(_):  # cuts that keep more than 40% of the teacher's parameters pass the floor
        kept = count_parameters(holder["trainer"].model) / holder["teacher_parameters"]
        return {"accuracy": 0.9 if kept > 0.4 else 0.5}

    trainer = make_trainer(
        tmp_path,
        compute_metrics=size_dependent_metric,
        stage_max_steps=1,
        stage_retries=4,
        sigma_quantile=0.2,
        target_metric_drop=0.01,
    )
    holder.update(trainer=trainer, teacher_parameters=count_parameters(trainer.model))
    model = trainer.compress()
    stage = trainer.compression_history["stages"][0]
    quantiles = [entry["sigma_quantile"] for entry in stage["tries"]]
    assert stage["status"] == "accepted" and quantiles[:2] == [0.2, 0.6]  # passed at 0.2: stronger next
    accepted = [entry for entry in stage["tries"] if entry["status"] == "accepted"]
    assert len(accepted) >= 2 and stage["sigma_quantile"] == max(entry["sigma_quantile"] for entry in accepted)
    assert count_parameters(model) == min(entry["num_parameters"] for entry in accepted)
    assert all(entry["num_parameters"] > 0.4 * holder["teacher_parameters"] for entry in accepted)


def test_a_later_try_trains_exactly_as_a_run_started_at_its_quantile(tmp_path):
    # the kept cut of a search can be rebuilt alone: --sigma_quantile=<kept> --stage_retries=0 gives the same weights
    quick = dict(stage_max_steps=40, target_metric_drop=0.5, screening_fraction=0.0)
    searched = make_trainer(tmp_path / "search", sigma_quantile=0.2, stage_retries=1, **quick)
    searched_model = searched.compress()
    stage = searched.compression_history["stages"][0]
    assert [entry["sigma_quantile"] for entry in stage["tries"]] == [0.2, 0.6] and stage["sigma_quantile"] == 0.6
    alone = make_trainer(tmp_path / "alone", sigma_quantile=0.6, stage_retries=0, **quick)
    alone_model = alone.compress()
    assert alone.compression_history["stages"][0]["num_parameters"] == stage["num_parameters"]
    for name, weight in alone_model.state_dict().items():
        torch.testing.assert_close(searched_model.state_dict()[name], weight, rtol=0, atol=0, msg=name)


def test_a_hopeless_cut_is_screened_out_early(tmp_path):
    holder, steps = {}, []

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    def hopeless_when_cut(_):
        cut = count_parameters(holder["trainer"].model) < holder["teacher_parameters"]
        return {"accuracy": 0.2 if cut else 0.9}

    trainer = make_trainer(
        tmp_path, compute_metrics=hopeless_when_cut, stage_max_steps=20, stage_retries=1, callbacks=[CountSteps()]
    )
    holder.update(trainer=trainer, teacher_parameters=count_parameters(trainer.model))
    model = trainer.compress()
    stage = trainer.compression_history["stages"][0]
    assert stage["status"].startswith("rolled back: screened out after 2 of 20 steps: accuracy 0.2000 < floor 0.8900")
    assert [entry["status"][:32] for entry in stage["tries"]] == ["rolled back: screened out after "] * 2
    assert [entry["screened_eval_accuracy"] for entry in stage["tries"]] == [0.2, 0.2]
    assert steps == [1, 2, 1, 2]  # two tries, two steps each, instead of 40
    assert set(model.config.boundary_sizes) == {model.config.norm_size}  # the model before the stage is kept


def test_nothing_left_to_cut_skips_every_stage(tmp_path):
    trainer = make_trainer(tmp_path, min_width=10_000, compression_schedule="per_layer", stage_max_steps=1)
    trainer.compress()
    statuses = [stage["status"] for stage in trainer.compression_history["stages"]]
    assert len(statuses) == 3 and all(status.startswith("skipped: nothing above") for status in statuses)


def test_budget_mode_meets_the_parameter_target(tmp_path):
    trainer = make_trainer(tmp_path, target_parameter_ratio=0.6, stage_max_steps=2, max_metric_drop=1.0)
    trainer.compress()
    history = trainer.compression_history
    ratio = history["final"]["num_parameters"] / history["teacher"]["num_parameters"]
    assert 0.45 < ratio <= 0.6
    assert history["stages"][0]["sigma_quantile"] != 0.5  # chosen by bisection


def test_quantile_shifts_move_the_budget_between_kinds_of_site(tmp_path):
    widths = {}
    for shifts in (None, {"ffn": 0.3}):
        trainer = make_trainer(
            tmp_path / str(shifts),
            target_parameter_ratio=0.6,
            stage_max_steps=0,
            max_metric_drop=1.0,
            sigma_quantile_shifts=None if shifts is None else json.dumps(shifts),  # as from the command line
        )
        trainer.compress()
        history = trainer.compression_history
        assert history["final"]["num_parameters"] <= 0.6 * history["teacher"]["num_parameters"]
        sites = history["stages"][0]["sites"]
        quantile = history["stages"][0]["sigma_quantile"]
        assert sites["ffn.0"]["sigma_quantile"] == pytest.approx(min(quantile + (shifts or {}).get("ffn", 0), 0.99))
        assert sites["boundary.1"]["sigma_quantile"] == pytest.approx(quantile)
        assert history["config"]["sigma_quantile_shifts"] == shifts
        widths[json.dumps(shifts)] = (sites["boundary.1"]["kept_width"], sites["ffn.0"]["kept_width"])
    (residual_plain, ffn_plain), (residual_shifted, ffn_shifted) = widths.values()
    assert residual_shifted > residual_plain and ffn_shifted < ffn_plain  # same budget, spent on the residual


def test_per_layer_schedule_stops_when_the_target_is_met(tmp_path):
    trainer = make_trainer(
        tmp_path,
        compression_schedule="per_layer",
        target_parameter_ratio=0.95,
        budget_search=False,
        sigma_quantile=0.9,
        stage_max_steps=2,
        max_metric_drop=1.0,
    )
    trainer.compress()
    stages = trainer.compression_history["stages"]
    assert stages[-1]["status"] == "accepted" and stages[-1]["parameter_ratio"] <= 0.95
    assert len(stages) < 3  # stopped before the last layer
    assert list(stages[0]["sites"]) == ["embeddings", "boundary.0"]


def test_the_latency_target_times_teacher_and_candidate_the_same_way(tmp_path):
    trainer = make_trainer(tmp_path, target_latency_ratio=0.99, stage_max_steps=1, max_metric_drop=1.0)
    trainer.compress()
    history = trainer.compression_history
    assert history["teacher"]["cpu_latency_seconds"] > 0
    assert 0 < history["stages"][0]["latency_ratio"] < float("inf")  # candidate time / teacher time, both recorded


def test_every_verdict_records_the_paired_standard_error_of_its_change_against_the_teacher(tmp_path):
    trainer = make_trainer(tmp_path, stage_max_steps=4, stage_retries=0, max_metric_drop=1.0)
    teacher = trainer.model
    with torch.no_grad():
        teacher_correct = rows_correct(teacher, trainer.eval_dataset)
    model = trainer.compress()
    history = trainer.compression_history
    stage = history["stages"][0]
    with torch.no_grad():
        student_correct = rows_correct(model, trainer.eval_dataset)
    differences = student_correct.float() - teacher_correct.float()
    expected = (differences.std() / len(differences) ** 0.5).item()  # std with n - 1, as the trainer's
    assert stage["status"] == "accepted" and expected > 0
    assert stage["paired_standard_error"] == pytest.approx(expected, rel=1e-6)
    assert stage["eval_accuracy"] == pytest.approx(student_correct.float().mean().item())
    assert 0 <= stage["screened_eval_accuracy"] <= 1  # the passing cut's metric after its first step, kept
    assert RunHistory.from_dict(history).teacher.validation_correct.tolist() == teacher_correct.tolist()
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    change = 100 * (stage["eval_accuracy"] - history["teacher"]["eval_accuracy"])
    assert f"validation accuracy {change:+.2f} ± {100 * expected:.2f} pt against the teacher" in card


def test_no_standard_error_is_claimed_for_a_metric_other_than_accuracy(tmp_path):
    def f1(prediction):
        return {"f1": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = make_trainer(
        tmp_path, compute_metrics=f1, compression_metric="f1", stage_max_steps=2, stage_retries=0, max_metric_drop=1.0
    )
    trainer.compress()
    history = trainer.compression_history
    assert "paired_standard_error" not in history["stages"][0]
    assert "validation_correct" not in history["teacher"]


def rows_correct(model, dataset) -> torch.Tensor:
    batch = default_data_collator([dataset[i] for i in range(len(dataset))])
    labels = batch.pop("labels")
    return model.eval()(**batch).logits.argmax(-1) == labels
