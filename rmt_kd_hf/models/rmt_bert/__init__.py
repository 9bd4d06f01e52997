from .configuration_rmt_bert import RMT_BERT_FORMAT_VERSION, RMTBertConfig
from .modeling_rmt_bert import (
    RMTBertForQuestionAnswering,
    RMTBertForSequenceClassification,
    RMTBertForTokenClassification,
    RMTBertModel,
    RMTBertPreTrainedModel,
)

__all__ = [
    "RMT_BERT_FORMAT_VERSION",
    "RMTBertConfig",
    "RMTBertForQuestionAnswering",
    "RMTBertForSequenceClassification",
    "RMTBertForTokenClassification",
    "RMTBertModel",
    "RMTBertPreTrainedModel",
]
