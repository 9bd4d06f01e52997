"""Configuration of a BERT whose widths were cut by RMT-KD.

This file travels with every compressed checkpoint (``trust_remote_code=True``): it imports nothing
but ``transformers``.
"""

from transformers import BertConfig

# Written into every config so that `trust_remote_code=True` finds the classes without rmt_kd_hf installed.
AUTO_MAP = {
    "AutoConfig": "configuration_rmt_bert.RMTBertConfig",
    "AutoModel": "modeling_rmt_bert.RMTBertModel",
    "AutoModelForSequenceClassification": "modeling_rmt_bert.RMTBertForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_rmt_bert.RMTBertForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_rmt_bert.RMTBertForQuestionAnswering",
}

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
        pooler_size (`int`): output width of the pooler.
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
    rmt_kd_format_version: int = RMT_BERT_FORMAT_VERSION

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
        super().__post_init__(**kwargs)
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self._check_widths()

    def _check_widths(self) -> None:
        if self.rmt_kd_format_version > RMT_BERT_FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses rmt_bert format version {self.rmt_kd_format_version}, newer than the "
                f"{RMT_BERT_FORMAT_VERSION} this code reads: upgrade rmt-kd-hf (pip install -U rmt-kd-hf)."
            )
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


__all__ = ["AUTO_MAP", "RMTBertConfig", "RMT_BERT_FORMAT_VERSION"]
