"""Configuration of a ModernBERT whose widths were cut by RMT-KD.

This file travels with every compressed checkpoint (``trust_remote_code=True``): it imports nothing but
``transformers``.
"""

from transformers import ModernBertConfig

RMT_MODERNBERT_FORMAT_VERSION = 1


class RMTModernBertConfig(ModernBertConfig):
    r"""
    A `ModernBertConfig` plus the widths RMT-KD chose. ModernBERT is pre-LayerNorm: every layer reads the one
    residual stream through a LayerNorm and adds to it, so the stream has one width (``residual_size``) and one
    basis throughout; the LayerNorms still normalise over the teacher's ``hidden_size`` coordinates and give their
    full width to the attention and the MLP ("lifted" LayerNorms), so heads, RoPE and the classifier are unchanged.

    Args:
        embedding_size (`int`): width of the token embeddings (before the embedding LayerNorm).
        residual_size (`int`): width of the residual stream.
        intermediate_sizes (`list[int]`): GeGLU width per layer (``Wi`` has twice as many outputs: input and gate).
        rmt_kd_format_version (`int`): version of this checkpoint format.
    """

    model_type = "rmt_modernbert"

    embedding_size: int | None = None
    residual_size: int | None = None
    intermediate_sizes: list[int] | None = None
    rmt_kd_format_version: int = RMT_MODERNBERT_FORMAT_VERSION

    def __post_init__(self, **kwargs):
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size
        if self.residual_size is None:
            self.residual_size = self.hidden_size
        if self.intermediate_sizes is None:
            self.intermediate_sizes = [self.intermediate_size] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        own_map = {
            "AutoConfig": "configuration_rmt_modernbert.RMTModernBertConfig",
            "AutoModel": "modeling_rmt_modernbert.RMTModernBertModel",
            "AutoModelForSequenceClassification": "modeling_rmt_modernbert.RMTModernBertForSequenceClassification",
            "AutoModelForTokenClassification": "modeling_rmt_modernbert.RMTModernBertForTokenClassification",
            "AutoModelForQuestionAnswering": "modeling_rmt_modernbert.RMTModernBertForQuestionAnswering",
        }
        self.auto_map = {**own_map, **(getattr(self, "auto_map", None) or {})}
        if self.rmt_kd_format_version > RMT_MODERNBERT_FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses rmt_modernbert format version {self.rmt_kd_format_version}, newer than the "
                f"{RMT_MODERNBERT_FORMAT_VERSION} this code reads: upgrade rmt-kd-hf (pip install -U rmt-kd-hf)."
            )
        if len(self.intermediate_sizes) != self.num_hidden_layers:
            raise ValueError(
                f"intermediate_sizes must have {self.num_hidden_layers} entries, got {len(self.intermediate_sizes)}"
            )
        if min(self.embedding_size, self.residual_size, *self.intermediate_sizes) < 1:
            raise ValueError("every RMT width must be >= 1")


__all__ = ["RMT_MODERNBERT_FORMAT_VERSION", "RMTModernBertConfig"]
