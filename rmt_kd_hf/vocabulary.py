"""Task-vocabulary trimming: keep only the word-embedding rows a task's text uses.

At two-thirds compression the word-embedding matrix of a small BERT holds most of what is left (MiniLM-L6:
30,522 rows). A task touches a few thousand of them. Trimming keeps

* every token id the training and calibration text produce,
* the special tokens (``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``),
* optionally the task's *alphabet*: the single-character pieces ``c`` and ``##c`` for every character the kept
  tokens contain, so that an unseen word made of known characters is still spelled out piece by piece instead
  of collapsing to ``[UNK]``;

and rebuilds the tokenizer with the same WordPiece settings in the new id order (new id = rank of the old id).

WordPiece is greedy longest-match-first, so any word whose original pieces are all kept is split exactly as
before: a longer match in the trimmed vocabulary would also have been one in the original. Text the vocabulary
was built from is therefore encoded to the same tokens, and the trimmed model reproduces the original exactly on
it. An unseen word is split with what is left: if some position has no matching piece, WordPiece maps the
*whole word* to ``[UNK]`` (the alphabet makes that happen only for unseen characters).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)

# tokenizer_config entries that describe where the old vocabulary came from, not how to tokenize.
_SOURCE_KWARGS = ("vocab", "vocab_file", "tokenizer_file", "name_or_path", "added_tokens_decoder", "is_local")


def _wordpiece_model(tokenizer: PreTrainedTokenizerBase):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if model is None or type(model).__name__ != "WordPiece":
        raise ValueError(
            f"Vocabulary trimming supports WordPiece fast tokenizers (BERT family); {type(tokenizer).__name__} uses "
            f"{type(model).__name__ if model is not None else 'no tokenizers backend'}."
        )
    return model


def used_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    max_length: int | None = None,
    batch_size: int = 1000,
) -> set[int]:
    """Token ids that ``tokenizer`` produces on ``texts`` (and ``text_pairs``), truncated as training would be."""
    used: set[int] = set()
    for start in range(0, len(texts), batch_size):
        pairs = None if text_pairs is None else list(text_pairs[start : start + batch_size])
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            pairs,
            truncation=max_length is not None,
            max_length=max_length,
        )
        for ids in encoded["input_ids"]:
            used.update(ids)
    return used


def vocabulary_to_keep(
    tokenizer: PreTrainedTokenizerBase, token_ids: Iterable[int], keep_alphabet: bool = True
) -> list[int]:
    """Sorted old ids to keep: ``token_ids``, the special tokens and (``keep_alphabet``) the task's characters.

    Args:
        tokenizer: the original WordPiece tokenizer.
        token_ids: ids the task uses (``used_token_ids``); ``input_ids`` of a tokenized dataset work too.
        keep_alphabet: also keep ``c`` and ``##c`` for every character ``c`` of the kept tokens' text.

    Returns:
        ``kept_token_ids``: (new_vocab_size,) ascending old ids; the new id of ``kept_token_ids[i]`` is ``i``.
    """
    model = _wordpiece_model(tokenizer)
    vocabulary = tokenizer.get_vocab()
    kept = {int(token_id) for token_id in token_ids} | set(tokenizer.all_special_ids)
    out_of_range = sorted(token_id for token_id in kept if not 0 <= token_id < len(vocabulary))
    if out_of_range:
        raise ValueError(f"token ids {out_of_range[:5]} are outside the tokenizer's 0..{len(vocabulary) - 1}")
    if keep_alphabet:
        prefix = model.continuing_subword_prefix
        special = set(tokenizer.all_special_tokens)
        characters = set()
        for token in tokenizer.convert_ids_to_tokens(sorted(kept)):
            if token not in special:
                characters.update(token.removeprefix(prefix))
        for character in characters:
            for piece in (character, prefix + character):
                if piece in vocabulary:
                    kept.add(vocabulary[piece])
    return sorted(kept)


def trim_tokenizer(tokenizer: PreTrainedTokenizerBase, kept_token_ids: Sequence[int]) -> PreTrainedTokenizerBase:
    """The same tokenizer class and settings with the vocabulary ``kept_token_ids`` (new id = position).

    Built through the tokenizer class's own ``vocab=`` constructor, so the post-processor's ``[CLS]``/``[SEP]`` ids
    and the special tokens follow the new ids; the normaliser, pre-tokenizer and decoder are copied from the
    original (they hold no ids). ``AutoTokenizer.from_pretrained`` reloads what ``save_pretrained`` writes.
    """
    model = _wordpiece_model(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(kept_token_ids))
    if len(set(tokens)) != len(tokens):
        raise ValueError("kept_token_ids must not repeat a token.")
    if model.unk_token not in tokens:
        raise ValueError(f"kept_token_ids must keep the unknown token {model.unk_token!r}.")
    settings = {key: value for key, value in tokenizer.init_kwargs.items() if key not in _SOURCE_KWARGS}
    trimmed = type(tokenizer)(vocab={token: new_id for new_id, token in enumerate(tokens)}, **settings)
    original_backend, backend = tokenizer.backend_tokenizer, trimmed.backend_tokenizer
    backend.normalizer = original_backend.normalizer
    backend.pre_tokenizer = original_backend.pre_tokenizer
    backend.decoder = original_backend.decoder
    trimmed_model = _wordpiece_model(trimmed)
    trimmed_model.continuing_subword_prefix = model.continuing_subword_prefix
    trimmed_model.max_input_chars_per_word = model.max_input_chars_per_word
    trimmed.model_max_length = tokenizer.model_max_length
    return trimmed


def trim_embeddings(model: PreTrainedModel, kept_token_ids: Sequence[int]) -> PreTrainedModel:
    """Keep the input-embedding rows ``kept_token_ids`` (in that order), in place; updates ``vocab_size`` and
    ``pad_token_id``. Works for ``Bert*`` teachers and ``RMTBert*`` students (factored or not).

    Raises:
        ValueError: the model ties an output (language-modelling) head to the embeddings, or drops ``[PAD]``.
    """
    if model.get_output_embeddings() is not None:
        raise ValueError(f"{type(model).__name__} has an output embedding head; trimming supports encoders only.")
    embeddings = model.get_input_embeddings()
    index = torch.as_tensor(list(kept_token_ids), dtype=torch.long, device=embeddings.weight.device)
    pad_token_id = model.config.pad_token_id
    new_pad_token_id = None
    if pad_token_id is not None:
        matches = (index == pad_token_id).nonzero()
        if len(matches) == 0:
            raise ValueError(f"kept_token_ids drops the padding token (id {pad_token_id}).")
        new_pad_token_id = int(matches[0, 0])
    trimmed = nn.Embedding(len(index), embeddings.embedding_dim, padding_idx=new_pad_token_id)
    trimmed.to(device=embeddings.weight.device, dtype=embeddings.weight.dtype)
    with torch.no_grad():
        trimmed.weight.copy_(embeddings.weight[index])
    trimmed.weight.requires_grad_(embeddings.weight.requires_grad)
    model.set_input_embeddings(trimmed)
    model.config.vocab_size = len(index)
    model.config.pad_token_id = new_pad_token_id
    return model


def _old_to_new_ids(kept_token_ids: Sequence[int], unk_token_id: int) -> torch.Tensor:
    """(max kept old id + 1,) lookup from old to new ids, every dropped id pointing at the new ``[UNK]``."""
    kept = torch.as_tensor(list(kept_token_ids), dtype=torch.long)
    lookup = torch.full((int(kept.max()) + 1,), -1, dtype=torch.long)
    lookup[kept] = torch.arange(len(kept))
    new_unk = int(lookup[unk_token_id]) if unk_token_id < len(lookup) else -1
    if new_unk < 0:
        raise ValueError(f"the unknown token (old id {unk_token_id}) is not kept.")
    return torch.where(lookup < 0, new_unk, lookup)


def _apply_lookup(input_ids: torch.Tensor, lookup: torch.Tensor, new_unk: int) -> torch.Tensor:
    remapped = lookup.to(input_ids.device)[input_ids.clamp(0, len(lookup) - 1)]
    return torch.where(input_ids >= len(lookup), new_unk, remapped)


def remap_token_ids(input_ids: torch.Tensor, kept_token_ids: Sequence[int], unk_token_id: int) -> torch.Tensor:
    """Old-vocabulary ``input_ids`` (any shape) in the trimmed vocabulary; dropped ids become ``unk_token_id``
    (the *old* id of ``[UNK]``). For datasets tokenized before trimming; re-tokenizing with the trimmed tokenizer is
    the same on the text the vocabulary was built from."""
    lookup = _old_to_new_ids(kept_token_ids, unk_token_id)
    return _apply_lookup(input_ids, lookup, int(lookup[unk_token_id]))


def remap_dataset_token_ids(dataset, kept_token_ids: Sequence[int], unk_token_id: int, column: str = "input_ids"):
    """A ``datasets.Dataset`` tokenized with the original vocabulary, its ``column`` remapped (``remap_token_ids``)."""
    lookup = _old_to_new_ids(kept_token_ids, unk_token_id)  # built once, not once per row
    new_unk = int(lookup[unk_token_id])

    def remap(batch: dict) -> dict:
        return {column: [_apply_lookup(torch.tensor(ids), lookup, new_unk).tolist() for ids in batch[column]]}

    return dataset.map(remap, batched=True, desc="Remapping token ids")


def dataset_token_ids(dataset, column: str = "input_ids", batch_size: int = 1000) -> set[int]:
    """Every id in ``dataset[column]`` (a tokenized ``datasets.Dataset`` or any sequence of rows with it)."""
    used: set[int] = set()
    if hasattr(dataset, "iter"):
        for batch in dataset.select_columns([column]).iter(batch_size=batch_size):
            for ids in batch[column]:
                used.update(int(token_id) for token_id in ids)
    else:
        for row in dataset:
            used.update(int(token_id) for token_id in row[column])
    return used


# per-token columns a re-split row can carry: each new piece repeats the value of its word's first piece
_RESPLIT_COLUMNS = frozenset({"input_ids", "attention_mask", "token_type_ids", "special_tokens_mask"})


class WordResplitter:
    """Rows of original-vocabulary ids split as the trimmed tokenizer would split their text.

    A word (a piece and the ``##`` pieces that follow it) holding a dropped token is tokenized again by the trimmed
    WordPiece model: into kept pieces, or into ``[UNK]`` when some position has no kept piece, exactly as the trimmed
    tokenizer treats that word. The pieces are given back as *original* ids (their place in ``kept_token_ids``), so
    :class:`TokenIdRemapCollator` maps them on as any other kept id. Rows longer than ``max_length`` afterwards lose
    pieces from the end of their longest segment (the tokenizer's ``longest_first`` truncation).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        trimmed_tokenizer: PreTrainedTokenizerBase,
        kept_token_ids: Sequence[int],
        max_length: int | None = None,
    ):
        self._prefix = _wordpiece_model(tokenizer).continuing_subword_prefix
        self._trimmed_model = _wordpiece_model(trimmed_tokenizer)
        self._kept = list(kept_token_ids)
        self._tokens = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
        self._dropped = set(self._tokens) - set(self._kept)
        self._special = set(tokenizer.all_special_ids)
        self._unk = tokenizer.unk_token_id
        self._words: dict[str, list[int]] = {}
        self.max_length = max_length

    def applies_to(self, feature) -> bool:
        """Whether ``feature`` is a row this can re-split: a mapping whose per-token columns are all known (token
        labels, for one, would lose their alignment)."""
        if not isinstance(feature, Mapping) or "input_ids" not in feature:
            return False
        length = len(feature["input_ids"])
        per_token = {key for key, value in feature.items() if _is_sequence(value) and len(value) == length}
        return per_token <= _RESPLIT_COLUMNS

    def _word_pieces(self, pieces: list[str]) -> list[int]:
        text = pieces[0] + "".join(piece[len(self._prefix) :] for piece in pieces[1:])
        if text not in self._words:
            self._words[text] = [self._kept[token.id] for token in self._trimmed_model.tokenize(text)]
        return self._words[text]

    def __call__(self, feature: Mapping) -> dict:
        ids = [int(token_id) for token_id in feature["input_ids"]]
        if not self._dropped.intersection(ids):
            return dict(feature)
        columns = {key: list(feature[key]) for key in feature if key in _RESPLIT_COLUMNS}
        rebuilt: dict[str, list] = {key: [] for key in columns}
        position = 0
        while position < len(ids):
            end = position + 1
            if ids[position] not in self._special:
                while end < len(ids) and ids[end] not in self._special and self._continues(ids[end]):
                    end += 1
            span = ids[position:end]
            pieces = span
            # special tokens are always kept; a span opening on a "##" piece is a word the truncation cut: [UNK]
            if not self._continues(span[0]) and self._dropped.intersection(span):
                pieces = self._word_pieces([self._tokens.get(token_id, "") for token_id in span]) or [self._unk]
            for key, values in columns.items():
                rebuilt[key].extend(pieces if key == "input_ids" else [values[position]] * len(pieces))
            position = end
        self._truncate(rebuilt)
        return {**feature, **rebuilt}

    def _continues(self, token_id: int) -> bool:
        return self._tokens.get(token_id, "").startswith(self._prefix)

    def _truncate(self, columns: dict[str, list]) -> None:
        ids = columns["input_ids"]
        while self.max_length is not None and len(ids) > self.max_length:
            segments, start = [], None
            for index, token_id in enumerate([*ids, None]):
                inside = token_id is not None and token_id not in self._special
                if inside and start is None:
                    start = index
                elif not inside and start is not None:
                    segments.append((index - start, index - 1))
                    start = None
            if not segments:
                return
            last = max(segments)[1]  # the last piece of the longest segment (of the later one on a tie)
            for values in columns.values():
                del values[last]


def _is_sequence(value) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() == 1)


class TokenIdRemapCollator:
    """Wraps a data collator so that batches of ids from the original tokenizer reach a trimmed model.

    Inside a trainer the datasets keep the teacher tokenizer's ids; the trimmed tokenizer is what gets saved. With a
    ``resplit`` (:class:`WordResplitter`), words holding a dropped token are first split as the trimmed tokenizer
    splits them, so that evaluations see what a user of the saved folder sees; without one (or for rows it cannot
    re-split), dropped ids become ``[UNK]``.
    """

    def __init__(
        self,
        collator,
        kept_token_ids: Sequence[int],
        unk_token_id: int,
        column: str = "input_ids",
        resplit: WordResplitter | None = None,
    ):
        self.collator = collator
        self.column = column
        self.resplit = resplit
        self._lookup = _old_to_new_ids(kept_token_ids, unk_token_id)
        self._new_unk = int(self._lookup[unk_token_id])

    def __call__(self, features):
        if self.resplit is not None and all(self.resplit.applies_to(feature) for feature in features):
            features = [self.resplit(feature) for feature in features]
        batch = self.collator(features)
        if self.column in batch:
            batch[self.column] = _apply_lookup(torch.as_tensor(batch[self.column]), self._lookup, self._new_unk)
        return batch


def training_vocabulary(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, train_dataset, has_encoder_vocabulary: bool
) -> tuple[list[int], PreTrainedTokenizerBase]:
    """The token ids a training set uses (with the special tokens and the alphabet) and the tokenizer trimmed to them,
    for a trainer that trims ``model``; a ``ValueError`` saying why when that cannot be done.

    Args:
        model: the teacher; its word embeddings are not touched here.
        tokenizer: the trainer's ``processing_class``.
        train_dataset: tokenized with ``tokenizer`` (an ``input_ids`` column).
        has_encoder_vocabulary: whether the architecture's embeddings are an encoder vocabulary this module trims.
    """
    columns = getattr(train_dataset, "column_names", None) or []
    if not has_encoder_vocabulary or model.get_output_embeddings() is not None:
        raise ValueError(f"{type(model).__name__} has no BERT encoder vocabulary to trim")
    if getattr(model.config, "position_ids_from_padding", False):
        raise ValueError(f"{type(model).__name__} counts its positions from the padding id, which trimming would move")
    if tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError("the trainer has no fast tokenizer as processing_class to trim and save with the model")
    if "input_ids" not in columns:
        raise ValueError("train_dataset has no input_ids column to read the task's tokens from")
    kept_token_ids = vocabulary_to_keep(tokenizer, dataset_token_ids(train_dataset))
    return kept_token_ids, trim_tokenizer(tokenizer, kept_token_ids)


def trainer_vocabulary(
    setting: bool | None, model: PreTrainedModel, tokenizer, train_dataset, has_encoder_vocabulary: bool
) -> tuple[list[int], PreTrainedTokenizerBase] | None:
    """:func:`training_vocabulary` under a trainer's ``trim_vocabulary`` ``setting``: ``None`` (not trimmed) when it is
    off, or when it is ``None`` (automatic) and trimming cannot be done here (logged); with ``True`` that is an error
    naming the reason."""
    if setting is False:
        return None
    try:
        return training_vocabulary(model, tokenizer, train_dataset, has_encoder_vocabulary)
    except ValueError as reason:
        if setting:
            raise ValueError(f"trim_vocabulary=True, but {reason}: set trim_vocabulary=False.") from None
        logger.info("Vocabulary not trimmed: %s.", reason)
        return None


def trim_vocabulary(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    max_length: int | None = None,
    keep_alphabet: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[int]]:
    """Trim ``model``'s word embeddings (in place) and ``tokenizer`` to the vocabulary of ``texts``.

    Pass the training and calibration text (never the test split). Save both with ``save_pretrained`` into one
    directory: ``AutoTokenizer`` + ``AutoModel…from_pretrained`` then work end to end.

    Returns:
        ``(model, trimmed_tokenizer, kept_token_ids)``; ``kept_token_ids[i]`` is the old id of new id ``i``.
    """
    kept_token_ids = vocabulary_to_keep(
        tokenizer, used_token_ids(tokenizer, texts, text_pairs, max_length), keep_alphabet
    )
    trimmed_tokenizer = trim_tokenizer(tokenizer, kept_token_ids)
    trim_embeddings(model, kept_token_ids)
    return model, trimmed_tokenizer, kept_token_ids


__all__ = [
    "TokenIdRemapCollator",
    "WordResplitter",
    "dataset_token_ids",
    "remap_dataset_token_ids",
    "remap_token_ids",
    "trim_embeddings",
    "trim_tokenizer",
    "trainer_vocabulary",
    "training_vocabulary",
    "trim_vocabulary",
    "used_token_ids",
    "vocabulary_to_keep",
]
