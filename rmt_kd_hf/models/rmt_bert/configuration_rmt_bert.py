"""Configuration of a BERT whose widths were cut by RMT-KD.

This file travels with every compressed checkpoint (``trust_remote_code=True``): it imports nothing
but ``transformers``.
"""

from transformers import BertConfig


def auto_map(config_class: str, model_prefix: str) -> dict[str, str]:
    """Written into every config so that `trust_remote_code=True` finds the classes without rmt_kd_hf installed."""
    return {
        "AutoConfig": f"configuration_rmt_bert.{config_class}",
        "AutoModel": f"modeling_rmt_bert.{model_prefix}Model",
        "AutoModelForSequenceClassification": f"modeling_rmt_bert.{model_prefix}ForSequenceClassification",
        "AutoModelForTokenClassification": f"modeling_rmt_bert.{model_prefix}ForTokenClassification",
        "AutoModelForQuestionAnswering": f"modeling_rmt_bert.{model_prefix}ForQuestionAnswering",
    }


AUTO_MAP = auto_map("RMTBertConfig", "RMTBert")

# How a family's sequence classifier reads the encoder's first token (all keep the teacher's weights exactly):
# "pooler": BERT's pooler (dense, tanh) then `classifier`; "dense_tanh": RoBERTa's `classifier.dense`, tanh,
# `classifier.out_proj`; "dense_gelu": ELECTRA's, with gelu; "pre_classifier_relu": DistilBERT's `pre_classifier`,
# ReLU, `classifier`.
CLASSIFIER_HEADS = ("pooler", "dense_tanh", "dense_gelu", "pre_classifier_relu")

# Bumped whenever the meaning of a field or a weight changes; loaders refuse newer versions and read older ones.
# 1: lifted LayerNorm weight W = P_out diag(γ) P_inᵀ plus a `gain_direction` g = P_out γ.
# 2: the centring is folded into the weight, W = P_out diag(γ) (I - 11ᵀ/norm_size) P_inᵀ (no `gain_direction`);
#    optional low-rank word embeddings (`word_embedding_rank`).
RMT_BERT_FORMAT_VERSION = 2


class RMTBertConfig(BertConfig):
    r"""
    A `BertConfig` plus the per-boundary widths that RMT-KD chose.

    The residual stream of a post-LayerNorm BERT crosses ``2 * num_hidden_layers + 1`` LayerNorms
    (embeddings, then per layer the attention-output and the output LayerNorm). Each boundary ``b``
    keeps its own width ``boundary_sizes[b]``; the LayerNorms still normalise over the teacher's
    ``norm_size`` coordinates ("lifted" LayerNorm, exact for the kept directions).

    Args:
        norm_size (`int`): width of the teacher's residual stream (the LayerNorm width).
        embedding_size (`int`): width of the word/position/type embeddings (before the first LayerNorm).
        boundary_sizes (`list[int]`): ``2 * num_hidden_layers + 1`` residual widths; boundary ``2l``
            is the input of layer ``l``, ``2l + 1`` its attention-output LayerNorm.
        intermediate_sizes (`list[int]`): FFN width per layer.
        query_key_head_sizes (`list[int]`): per-layer query/key size of one attention head.
        value_head_sizes (`list[int]`): per-layer value size of one attention head.
        attention_scale (`float`): softmax scale, kept from the teacher (``1/sqrt(teacher head size)``).
        word_embedding_rank (`int`, *optional*): when set, the word embeddings are a ``(vocab_size, rank)`` table
            followed by a ``(rank -> embedding_size)`` projection (format version >= 2).
        pooler_size (`int`): output width of the pooler (or of the classification head's dense layer).
        embedding_norm_size (`int`): the width the embedding LayerNorm normalises over (the teacher's embedding
            width; ``norm_size`` unless the teacher projects its embeddings, as ELECTRA's ``embeddings_project``,
            which is folded into that LayerNorm's weight).
        classifier_head (`str`): the family's sequence-classification head, one of ``CLASSIFIER_HEADS``.
        position_ids_from_padding (`bool`): RoBERTa's position ids: counted over the non-padding tokens from
            ``pad_token_id + 1``, padding tokens at ``pad_token_id``.
        rmt_kd_format_version (`int`): version of this checkpoint format.
    """

    model_type = "rmt_bert"

    norm_size: int | None = None
    embedding_size: int | None = None
    boundary_sizes: list[int] | None = None
    intermediate_sizes: list[int] | None = None
    query_key_head_sizes: list[int] | None = None
    value_head_sizes: list[int] | None = None
    attention_scale: float | None = None
    word_embedding_rank: int | None = None
    pooler_size: int | None = None
    embedding_norm_size: int | None = None
    classifier_head: str = "pooler"
    position_ids_from_padding: bool = False
    rmt_kd_format_version: int = RMT_BERT_FORMAT_VERSION

    _model_class_prefix = "RMTBert"

    def __post_init__(self, **kwargs):
        num_layers = self.num_hidden_layers
        head_size = self.hidden_size // self.num_attention_heads
        if self.norm_size is None:
            self.norm_size = self.hidden_size
        if self.embedding_size is None:
            self.embedding_size = self.norm_size
        if self.boundary_sizes is None:
            self.boundary_sizes = [self.norm_size] * (2 * num_layers + 1)
        if self.intermediate_sizes is None:
            self.intermediate_sizes = [self.intermediate_size] * num_layers
        if self.query_key_head_sizes is None:
            self.query_key_head_sizes = [head_size] * num_layers
        if self.value_head_sizes is None:
            self.value_head_sizes = [head_size] * num_layers
        if self.attention_scale is None:
            self.attention_scale = head_size**-0.5
        if self.pooler_size is None:
            self.pooler_size = self.norm_size
        if self.embedding_norm_size is None:
            self.embedding_norm_size = self.norm_size
        super().__post_init__(**kwargs)
        own_map = auto_map(type(self).__name__, self._model_class_prefix)
        self.auto_map = {**own_map, **(getattr(self, "auto_map", None) or {})}
        self._check_widths()

    def _check_widths(self) -> None:
        if self.rmt_kd_format_version > RMT_BERT_FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses rmt_bert format version {self.rmt_kd_format_version}, newer than the "
                f"{RMT_BERT_FORMAT_VERSION} this code reads: upgrade rmt-kd-hf (pip install -U rmt-kd-hf)."
            )
        if self.classifier_head not in CLASSIFIER_HEADS:
            raise ValueError(f"classifier_head must be one of {CLASSIFIER_HEADS}, got {self.classifier_head!r}")
        num_layers = self.num_hidden_layers
        expected = {
            "boundary_sizes": 2 * num_layers + 1,
            "intermediate_sizes": num_layers,
            "query_key_head_sizes": num_layers,
            "value_head_sizes": num_layers,
        }
        for name, length in expected.items():
            widths = getattr(self, name)
            if len(widths) != length:
                raise ValueError(f"{name} must have {length} entries for {num_layers} layers, got {len(widths)}")
            if any(int(width) < 1 for width in widths):
                raise ValueError(f"every entry of {name} must be >= 1, got {widths}")
        if self.word_embedding_rank is not None:
            if self.rmt_kd_format_version < 2:
                raise ValueError("word_embedding_rank needs rmt_kd_format_version >= 2.")
            if not 1 <= self.word_embedding_rank:
                raise ValueError(f"word_embedding_rank must be >= 1, got {self.word_embedding_rank}")
        # The last boundary is what the encoder outputs: heads read it as `hidden_size`.
        self.hidden_size = self.boundary_sizes[-1]


class RMTRobertaConfig(RMTBertConfig):
    """An ``RMTBertConfig`` for a compressed RoBERTa: position ids from the padding, RoBERTa's classification
    head (``dense → tanh → out_proj``), no token-type distinction (``type_vocab_size=1``)."""

    model_type = "rmt_roberta"
    classifier_head: str = "dense_tanh"
    position_ids_from_padding: bool = True
    _model_class_prefix = "RMTRoberta"


class RMTXLMRobertaConfig(RMTRobertaConfig):
    """An ``RMTRobertaConfig`` for a compressed XLM-RoBERTa (the same layers)."""

    model_type = "rmt_xlm_roberta"
    _model_class_prefix = "RMTXLMRoberta"


class RMTElectraConfig(RMTBertConfig):
    """An ``RMTBertConfig`` for a compressed ELECTRA discriminator: its ``embeddings_project`` folded into the
    embedding LayerNorm (``embedding_norm_size`` = the teacher's ``embedding_size``), no pooler, ELECTRA's
    classification head (``dense → gelu → out_proj``)."""

    model_type = "rmt_electra"
    classifier_head: str = "dense_gelu"
    _model_class_prefix = "RMTElectra"


class RMTDistilBertConfig(RMTBertConfig):
    """An ``RMTBertConfig`` for a compressed DistilBERT, in BERT's field names (``dim`` is ``hidden_size``, ``n_layers``
    ``num_hidden_layers``, ...): no token types (``type_vocab_size=1``, a zero table), no pooler, DistilBERT's
    classification head (``pre_classifier → ReLU → classifier``)."""

    model_type = "rmt_distilbert"
    classifier_head: str = "pre_classifier_relu"
    type_vocab_size: int = 1
    _model_class_prefix = "RMTDistilBert"


__all__ = [
    "AUTO_MAP",
    "CLASSIFIER_HEADS",
    "RMTBertConfig",
    "RMTDistilBertConfig",
    "RMTElectraConfig",
    "RMTRobertaConfig",
    "RMTXLMRobertaConfig",
    "RMT_BERT_FORMAT_VERSION",
]
