"""Architecture families RMT-KD can cut: one module each, all behind ``get_surgery``."""

from torch import nn

from .base import ArchitectureSurgery, Site, SiteAnalysis
from .bert import BertSurgery, is_bert_family
from .modernbert import ModernBertSurgery, is_modernbert_family
from .resnet import ResNetSurgery, is_resnet_family


def get_surgery(model: nn.Module, **options) -> ArchitectureSurgery:
    """The surgery for ``model``'s architecture family; a clear error for anything unsupported.

    ``options`` go to the family's surgery (BERT: ``reduce_attention_heads``, ``factorize_word_embeddings``).
    """
    if is_bert_family(model):
        return BertSurgery(**options)
    if is_modernbert_family(model):
        return ModernBertSurgery(**options)
    if is_resnet_family(model):
        if options:
            raise ValueError(f"Surgery options {sorted(options)} apply to BERT models only, not to ResNets.")
        return ResNetSurgery()
    raise ValueError(
        f"RMT-KD has no surgery for {type(model).__name__}. Supported: the encoders BERT, RoBERTa, XLM-RoBERTa, "
        "ELECTRA, DistilBERT, ModernBERT (their *Model, *ForSequenceClassification, *ForTokenClassification and "
        "*ForQuestionAnswering classes), ResNetModel, ResNetForImageClassification, "
        "TimmWrapperForImageClassification around a plain timm ResNet, and the compressed RMT* versions of all of "
        "them."
    )


__all__ = [
    "ArchitectureSurgery",
    "BertSurgery",
    "ModernBertSurgery",
    "ResNetSurgery",
    "Site",
    "SiteAnalysis",
    "get_surgery",
]
