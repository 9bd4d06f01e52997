import pytest
import torch
from transformers import BertForSequenceClassification

from rmt_kd_hf.teacher_outputs import TeacherOutputCache, cache_bytes_for

from .conftest import make_batches, make_trainer, tiny_bert_config


class CountingTeacher(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, **features):
        self.calls += 1
        return self.model(**features)


def features_of(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "labels"}


def reordered(batch: dict, order: list[int], seq_length: int) -> dict:
    """The rows of ``batch`` in another order, right-padded to ``seq_length`` (another batch of the same rows)."""
    features = {}
    for key, value in features_of(batch).items():
        rows = value[order]
        if seq_length > value.shape[1]:
            rows = torch.cat([rows, rows.new_zeros((len(order), seq_length - value.shape[1]))], dim=1)
        features[key] = rows[:, :seq_length]
    return features


def test_rows_seen_are_answered_from_memory_as_the_teacher_would():
    torch.manual_seed(0)
    teacher = CountingTeacher(BertForSequenceClassification(tiny_bert_config()).eval())
    batch = make_batches(1, seq_length=16)[0]
    cache = TeacherOutputCache(2**20)
    with torch.no_grad():
        logits, states = cache.outputs(teacher, features_of(batch), output_hidden_states=True)
        assert teacher.calls == 1 and len(cache) == 8 and cache.used_bytes > 0
        # the same rows in another order and padded to another length: no teacher call, the teacher's outputs
        order = [3, 1, 7, 0, 2, 6, 5, 4]
        longer = reordered(batch, order, 20)
        cached_logits, cached_states = cache.outputs(teacher, longer, output_hidden_states=True)
        assert teacher.calls == 1 and cache.hits == 1
        direct = teacher.model(**longer, output_hidden_states=True)
    torch.testing.assert_close(cached_logits, direct.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached_logits, logits[order])
    real = longer["attention_mask"].bool()
    assert len(cached_states) == len(direct.hidden_states) == len(states)
    for cached, expected in zip(cached_states, direct.hidden_states, strict=True):
        assert cached.shape == expected.shape
        torch.testing.assert_close(cached[real], expected[real], atol=1e-5, rtol=1e-5)
        assert not cached[~real].any()  # padding: zeros (the hidden-state loss masks it)


def test_a_batch_with_an_unseen_row_goes_to_the_teacher_and_is_kept_while_room_is_left():
    torch.manual_seed(0)
    teacher = CountingTeacher(BertForSequenceClassification(tiny_bert_config()).eval())
    first, second = make_batches(2, seq_length=16)
    with torch.no_grad():
        logits_only = TeacherOutputCache(2**20)
        logits_only.outputs(teacher, features_of(first), output_hidden_states=False)
        logits_only.outputs(teacher, features_of(first), output_hidden_states=True)  # states never kept: teacher
        assert teacher.calls == 2 and logits_only.hits == 0
        logits_only.outputs(teacher, features_of(first), output_hidden_states=True)
        assert teacher.calls == 2 and logits_only.hits == 1

        small = TeacherOutputCache(1)  # room for nothing
        small.outputs(teacher, features_of(first), output_hidden_states=True)
        small.outputs(teacher, features_of(first), output_hidden_states=True)
        assert (len(small), small.used_bytes, teacher.calls) == (0, 0, 4)

        off = TeacherOutputCache(0)
        off.outputs(teacher, features_of(first), output_hidden_states=True)
        off.outputs(teacher, features_of(first), output_hidden_states=True)
        assert (len(off), teacher.calls) == (0, 6)

        mixed = TeacherOutputCache(2**20)
        mixed.outputs(teacher, features_of(first), output_hidden_states=False)
        half = {key: torch.cat([value[:4], second[key][:4]]) for key, value in features_of(first).items()}
        mixed_logits, _ = mixed.outputs(teacher, half, output_hidden_states=False)
        assert teacher.calls == 8 and len(mixed) == 12
        torch.testing.assert_close(mixed_logits, teacher.model(**half).logits)


def test_left_padded_batches_and_batches_without_an_attention_mask_always_go_to_the_teacher():
    torch.manual_seed(0)
    teacher = CountingTeacher(BertForSequenceClassification(tiny_bert_config()).eval())
    batch = features_of(make_batches(1, seq_length=16)[0])
    left = {key: value.flip(1) for key, value in batch.items()}  # real tokens at the end
    cache = TeacherOutputCache(2**20)
    with torch.no_grad():
        for features in (left, left, {"input_ids": batch["input_ids"]}, {"input_ids": batch["input_ids"]}):
            cache.outputs(teacher, features, output_hidden_states=False)
    assert (teacher.calls, len(cache), cache.hits) == (4, 0, 0)


@pytest.mark.parametrize(
    ("steps", "rows_per_step", "rows", "expected"),
    [(60, 16, 320, 5 * 2**20), (20, 16, 320, 0), (19, 16, 320, 0), (10, 8, 0, 0)],
)
def test_the_cache_is_only_given_memory_when_rows_come_back(steps, rows_per_step, rows, expected):
    assert cache_bytes_for(5, steps, rows_per_step, rows) == expected


def test_distillation_over_several_epochs_runs_the_teacher_once_a_row_and_trains_as_without_the_cache(
    tmp_path, monkeypatch
):
    import rmt_kd_hf.trainer as trainer_module

    caches = []

    class RecordingCache(TeacherOutputCache):
        def __init__(self, max_bytes):
            super().__init__(max_bytes)
            caches.append(self)

    monkeypatch.setattr(trainer_module, "TeacherOutputCache", RecordingCache)
    results = {}
    for megabytes in (0, 64):
        trainer = make_trainer(
            tmp_path / str(megabytes),
            stage_max_steps=60,  # 3 epochs of 320 rows at 16 a step
            max_metric_drop=1.0,
            stage_retries=0,
            screening_fraction=0.0,
            teacher_output_cache_mb=megabytes,
        )
        trainer.compress()
        used = [cache for cache in caches if cache.max_bytes > 0]
        results[megabytes] = (trainer.model.state_dict(), [(cache.hits, cache.misses) for cache in used])
        caches.clear()
    assert results[0][1] == []
    assert results[64][1] == [(40, 20)]  # the first epoch runs the teacher, the next two read its outputs
    for name, tensor in results[0][0].items():
        torch.testing.assert_close(results[64][0][name], tensor, atol=1e-5, rtol=1e-5, msg=name)
