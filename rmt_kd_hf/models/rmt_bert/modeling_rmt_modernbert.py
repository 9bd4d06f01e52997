"""PyTorch ModernBERT with the widths chosen by RMT-KD: transformers' own ModernBERT layers, with the modules that
touch the residual stream replaced by narrower ones.

This file travels with every compressed checkpoint so that ``trust_remote_code=True`` loads it without
``rmt_kd_hf`` installed: it imports only torch, the public transformers API and its siblings.

Shapes: the residual stream has ``config.residual_size`` coordinates (the teacher's stream in an orthonormal basis
of its kept directions); every LayerNorm lifts it back to ``hidden_size`` for the attention, the MLP and the head.
"""

from torch import nn
from transformers import (
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
    ModernBertModel,
)

from .configuration_rmt_modernbert import RMTModernBertConfig
from .modeling_rmt_bert import RMTLiftedLayerNorm, init_lifted_norm


def narrow_modernbert(model: ModernBertModel, config: RMTModernBertConfig) -> None:
    """Replace, in place, the full-width modules of a freshly built ``ModernBertModel`` by ``config``'s widths.

    Token table ``(vocab, embedding_size)``; the embedding LayerNorm ``embedding_size -> residual_size``; per layer
    the LayerNorms ``residual_size -> hidden_size`` (layer 0 has none before its attention: its ``Wqkv`` reads the
    stream), ``attn.Wo`` ``hidden_size -> residual_size``, the GeGLU ``Wi`` ``hidden_size -> 2 · intermediate`` and
    ``Wo`` ``intermediate -> residual_size`` (with a bias: it carries the dropped neurons' mean); ``final_norm``
    ``residual_size -> hidden_size``.
    """
    width, stream, embedding = config.hidden_size, config.residual_size, config.embedding_size

    def lifted(in_features: int, out_features: int) -> RMTLiftedLayerNorm:
        return RMTLiftedLayerNorm(in_features, out_features, width, config.norm_eps, centred=True)

    model.embeddings.tok_embeddings = nn.Embedding(config.vocab_size, embedding, padding_idx=config.pad_token_id)
    model.embeddings.norm = lifted(embedding, stream)
    for index, layer in enumerate(model.layers):
        if index == 0:
            layer.attn.Wqkv = nn.Linear(stream, 3 * width, bias=config.attention_bias)
        else:
            layer.attn_norm = lifted(stream, width)
        layer.attn.Wo = nn.Linear(width, stream, bias=config.attention_bias)
        layer.mlp_norm = lifted(stream, width)
        intermediate = config.intermediate_sizes[index]
        layer.mlp.Wi = nn.Linear(width, 2 * intermediate, bias=config.mlp_bias)
        layer.mlp.Wo = nn.Linear(intermediate, stream, bias=True)
    model.final_norm = lifted(stream, width)


class RMTModernBertMixin:
    """Narrow the ModernBERT built by the parent class, and initialise lifted LayerNorms as plain ones."""

    config_class = RMTModernBertConfig

    def _narrow(self, config: RMTModernBertConfig) -> None:
        narrow_modernbert(self if isinstance(self, ModernBertModel) else self.model, config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, RMTLiftedLayerNorm):
            init_lifted_norm(module)
            return
        super()._init_weights(module)


class RMTModernBertModel(RMTModernBertMixin, ModernBertModel):
    def __init__(self, config: RMTModernBertConfig):
        super().__init__(config)
        self._narrow(config)


class RMTModernBertForSequenceClassification(RMTModernBertMixin, ModernBertForSequenceClassification):
    def __init__(self, config: RMTModernBertConfig):
        super().__init__(config)
        self._narrow(config)


class RMTModernBertForTokenClassification(RMTModernBertMixin, ModernBertForTokenClassification):
    def __init__(self, config: RMTModernBertConfig):
        super().__init__(config)
        self._narrow(config)


class RMTModernBertForQuestionAnswering(RMTModernBertMixin, ModernBertForQuestionAnswering):
    def __init__(self, config: RMTModernBertConfig):
        super().__init__(config)
        self._narrow(config)


MODERNBERT_CLASSES = (
    RMTModernBertModel,
    RMTModernBertForSequenceClassification,
    RMTModernBertForTokenClassification,
    RMTModernBertForQuestionAnswering,
)

__all__ = [
    "MODERNBERT_CLASSES",
    "RMTModernBertForQuestionAnswering",
    "RMTModernBertForSequenceClassification",
    "RMTModernBertForTokenClassification",
    "RMTModernBertModel",
    "narrow_modernbert",
]
