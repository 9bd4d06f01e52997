import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from rmt_kd_hf import compress_model

from ..conftest import logits_of, make_batches, tiny_bert_config

FACTORED = {"factorize_word_embeddings": True}


def low_rank_teacher(vocab_size: int, rank: int, noise: float, seed: int = 0) -> BertForSequenceClassification:
    """A tiny BERT whose word table is rank ``rank`` plus isotropic noise of standard deviation ``noise``."""
    generator = torch.Generator().manual_seed(seed)
    teacher = BertForSequenceClassification(tiny_bert_config(vocab_size=vocab_size)).eval()
    hidden = teacher.config.hidden_size
    signal = torch.randn(vocab_size, rank, generator=generator) @ torch.randn(rank, hidden, generator=generator)
    with torch.no_grad():
        teacher.bert.embeddings.word_embeddings.weight.copy_(
            signal + noise * torch.randn(vocab_size, hidden, generator=generator)
        )
    return teacher


def test_the_mp_rule_finds_the_rank_of_a_low_rank_word_table():
    teacher = low_rank_teacher(vocab_size=3000, rank=5, noise=0.05)
    batches = make_batches(vocab_size=3000)
    _, report = compress_model(teacher, batches, keep_all=True, progress=False, surgery_options=FACTORED)
    assert report.kept_widths["word_embeddings"] == 48  # keep_all keeps every direction ...
    student, report = compress_model(teacher, batches, sigma_quantile=0.5, progress=False, surgery_options=FACTORED)
    analysis = report.analyses["word_embeddings"]
    assert analysis.kept_width == 5  # ... the MP edge separates the 5 signal directions from the noise
    assert student.config.word_embedding_rank == 5
    embeddings = student.bert.embeddings
    assert embeddings.word_embeddings.weight.shape == (3000, 5)
    assert embeddings.word_embeddings_projection.weight.shape == (student.config.embedding_size, 5)


def test_factoring_at_the_signal_rank_loses_only_the_noise(tmp_path):
    teacher = low_rank_teacher(vocab_size=3000, rank=5, noise=1e-4)
    batches = make_batches(vocab_size=3000)
    student, report = compress_model(
        teacher, batches, keep_all=True, kept_widths={"word_embeddings": 5}, progress=False, surgery_options=FACTORED
    )
    assert student.config.word_embedding_rank == 5
    for batch in batches[:2]:
        torch.testing.assert_close(logits_of(student, batch), logits_of(teacher, batch), atol=1e-3, rtol=0)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert torch.equal(logits_of(reloaded, batches[0]), logits_of(student, batches[0]))
    # A factored model compressed again (without the rank site) keeps its factors and its outputs.
    again, _ = compress_model(student, batches, keep_all=True, progress=False)
    assert again.config.word_embedding_rank == 5
    torch.testing.assert_close(logits_of(again, batches[0]), logits_of(student, batches[0]), atol=1e-5, rtol=0)


def test_a_rank_that_saves_nothing_leaves_the_table_whole(batches):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    student, _ = compress_model(
        teacher, batches, keep_all=True, kept_widths={"word_embeddings": 40}, progress=False, surgery_options=FACTORED
    )
    # 40 x (120 + 48) > 120 x 48: factoring would add parameters.
    assert student.config.word_embedding_rank is None
    assert student.bert.embeddings.word_embeddings_projection is None
    assert student.bert.embeddings.word_embeddings.weight.shape == (120, 48)
