"""The peer adapters of ``benchmarks/peers.py`` on a tiny BERT: Torch-Pruning's cut, TextPruner's masks applied,
parameter bisection, saving and loading each arm, and ``RMTKDTrainer.distil`` on a model another tool cut."""

import os
import sys

import pytest
import torch
from transformers import BertForSequenceClassification, default_data_collator

from rmt_kd_hf import RMTKDConfig, RMTKDTrainer
from rmt_kd_hf.surgery.base import count_parameters

from .conftest import QUIET_CPU_ARGS, make_batches, tiny_bert_config, token_task

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import peers  # noqa: E402

torch_pruning = pytest.importorskip(
    "torch_pruning", reason="Torch-Pruning is not installed: `pip install -e '.[peers]'` (make test installs it)"
)


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval()


def inputs_of(batch):
    return {key: value for key, value in batch.items() if key != "labels"}


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_torch_pruning_cuts_hidden_ffn_and_heads_and_the_result_loads_back(teacher, tmp_path, importance):
    batches = make_batches(3)
    gradients = peers.task_gradients(teacher, batches[1:]) if importance == "taylor" else None
    student = peers.torch_pruning_prune(teacher, 0.5, importance, inputs_of(batches[0]), gradients)
    config = student.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (24, 48, 2)
    assert teacher.config.hidden_size == 48  # the teacher is left as it was
    channels = peers.kept_channels(teacher.bert.embeddings.word_embeddings, student.bert.embeddings.word_embeddings)
    kept = teacher.bert.embeddings.word_embeddings.weight[:, channels]
    assert torch.equal(kept, student.bert.embeddings.word_embeddings.weight)
    if importance == "taylor":  # the gradients decide: another choice than the weights' norms
        magnitude = peers.torch_pruning_prune(teacher, 0.5, "magnitude", inputs_of(batches[0]))
        other = peers.kept_channels(teacher.bert.embeddings.word_embeddings, magnitude.bert.embeddings.word_embeddings)
        assert not torch.equal(channels, other)
    assert peers.save_arm(student, _tokenizer(), str(tmp_path))
    loaded = peers.load_arm(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs_of(batches[0])).logits, student(**inputs_of(batches[0])).logits)


def test_a_cut_whose_heads_no_longer_fill_the_hidden_size_is_saved_with_its_structure(teacher, tmp_path):
    batch = inputs_of(make_batches(1)[0])
    student = peers.torch_pruning_prune(teacher, 0.3, "magnitude", batch)
    attention = student.bert.encoder.layer[0].attention.self
    assert student.config.hidden_size != attention.all_head_size  # 34 wide, 3 heads of 12
    assert not peers.save_arm(student, _tokenizer(), str(tmp_path))  # BertConfig would give heads of 11
    with torch.no_grad():
        assert torch.equal(peers.load_arm(str(tmp_path))(**batch).logits, student(**batch).logits)


def test_the_ratio_is_bisected_to_the_parameter_count(teacher):
    example = inputs_of(make_batches(1)[0])
    target = count_parameters(teacher) // 2
    student, ratio = peers.bisect_ratio(
        lambda ratio: peers.torch_pruning_prune(teacher, ratio, "magnitude", example), count_parameters, target
    )
    assert abs(count_parameters(student) - target) <= peers.PARAMETER_TOLERANCE * target and 0 < ratio < 1
    with pytest.raises(ValueError, match="no pruning ratio gives 10 parameters"):
        peers.bisect_ratio(
            lambda ratio: peers.torch_pruning_prune(teacher, ratio, "magnitude", example), count_parameters, 10, 4
        )


def test_masks_remove_exactly_the_heads_and_neurons_they_zero(teacher, tmp_path):
    head_mask = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]])
    ffn_mask = (torch.arange(96) % 3 != 0).repeat(2, 1).int()
    student = peers.apply_head_and_ffn_masks(teacher, head_mask, ffn_mask)
    zeroed = BertForSequenceClassification(teacher.config).eval()
    zeroed.load_state_dict(teacher.state_dict())
    with torch.no_grad():  # a head whose values are 0 adds nothing; nor does an FFN neuron whose input is 0
        for layer, heads, neurons in zip(zeroed.bert.encoder.layer, head_mask, ffn_mask, strict=True):
            for head in (heads == 0).nonzero()[:, 0]:
                rows = slice(head * 12, (head + 1) * 12)
                layer.attention.self.value.weight[rows] = 0
                layer.attention.self.value.bias[rows] = 0
            layer.intermediate.dense.weight[neurons == 0] = 0
            layer.intermediate.dense.bias[neurons == 0] = 0
    batch = inputs_of(make_batches(1)[0])
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits, zeroed(**batch).logits, atol=1e-5, rtol=1e-5)
    student.config.intermediate_size = 64
    assert not peers.save_arm(student, _tokenizer(), str(tmp_path))  # BertConfig cannot say 2 heads of 12 in 48
    with torch.no_grad():
        assert torch.equal(peers.load_arm(str(tmp_path))(**batch).logits, student(**batch).logits)


def test_textpruner_sizes_meet_the_target_or_say_it_is_out_of_reach(teacher):
    target = int(0.6 * count_parameters(teacher))
    heads, ffn = peers.textpruner_sizes(teacher, 120, target)
    head_mask = (torch.arange(4) < heads).repeat(2, 1).int()
    ffn_mask = (torch.arange(96) < ffn).repeat(2, 1).int()
    student = peers.apply_head_and_ffn_masks(teacher, head_mask, ffn_mask)
    assert abs(count_parameters(student) - target) <= 0.02 * target
    with pytest.raises(ValueError, match="out of reach when the hidden size stays 48"):
        peers.textpruner_sizes(teacher, 120, count_parameters(teacher) // 5)


class HiddenStateCheckingTrainer(RMTKDTrainer):
    """Records each training loss and checks that the hidden-state term is on while it is computed."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        assert self._hidden_state_bases is not None and self.teacher_model is not None
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses = [*getattr(self, "losses", []), float(loss.detach())]
        return loss


def test_distil_trains_a_model_another_tool_cut_with_hidden_states_in_its_kept_basis(tmp_path):
    teacher = BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    student = peers.torch_pruning_prune(teacher, 0.5, "magnitude", inputs_of(make_batches(1)[0]))
    channels = peers.kept_channels(teacher.bert.embeddings.word_embeddings, student.bert.embeddings.word_embeddings)
    bases = peers.selection_bases(channels, 48, teacher.config.num_hidden_layers + 1)
    trainer = HiddenStateCheckingTrainer(
        model=teacher,
        args=RMTKDConfig(output_dir=str(tmp_path), stage_max_steps=3, learning_rate=1e-3, **QUIET_CPU_ARGS),
        train_dataset=token_task(64, 0),
        eval_dataset=token_task(32, 1),
        data_collator=default_data_collator,
    )
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    assert trainer.distil(student, teacher, bases) is None
    assert trainer.model is student and trainer._hidden_state_bases is None and len(trainer.losses) == 3
    assert all(torch.isfinite(torch.tensor(trainer.losses)))
    assert any(not torch.equal(tensor, before[name]) for name, tensor in student.state_dict().items())


def _tokenizer():
    from transformers import BertTokenizerFast

    from .conftest import TINY_VOCAB

    return BertTokenizerFast(vocab=TINY_VOCAB)


@pytest.mark.skipif(
    not peers.textpruner_environment_ready(),
    reason=f"TextPruner runs in {peers.PEERS_VENV_PYTHON} (transformers 4.x), not created here: see "
    "benchmarks/textpruner_masks.py",
)
def test_textpruner_masks_in_its_own_environment(teacher, tmp_path):
    trainer = RMTKDTrainer(
        model=teacher,
        args=RMTKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, **QUIET_CPU_ARGS),
        train_dataset=token_task(32, 0).map(lambda row: {"labels": row["labels"] % 3}),
        eval_dataset=token_task(16, 1),
        data_collator=default_data_collator,
    )
    masks = peers.textpruner_masks(teacher, trainer, 2, 40, 0, 2, str(tmp_path))
    assert masks["head_mask"].shape == (2, 4) and masks["head_mask"].sum(-1).tolist() == [2, 2]
    assert masks["ffn_mask"].sum(-1).tolist() == [40, 40] and masks["settings"]["target_ffn_size"] == 40
