"""RMT-KD for Hugging Face: cut hidden widths to the directions above the Marchenko–Pastur edge."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .calibration import ActivationTap, collect_covariances
from .compression import CompressionReport, analyse_sites, compress_model, format_widths_table, plan_widths
from .config import RMTKDConfig
from .export import export_onnx
from .losses import distillation_loss
from .models.rmt_bert import (
    FAMILY_CLASSES,
    RMTBertConfig,
    RMTBertForQuestionAnswering,
    RMTBertForSequenceClassification,
    RMTBertForTokenClassification,
    RMTBertModel,
    RMTElectraConfig,
    RMTElectraForSequenceClassification,
    RMTRobertaConfig,
    RMTRobertaForSequenceClassification,
    RMTXLMRobertaConfig,
    RMTXLMRobertaForSequenceClassification,
)
from .models.rmt_bert.configuration_rmt_modernbert import RMTModernBertConfig
from .models.rmt_bert.modeling_rmt_modernbert import MODERNBERT_CLASSES, RMTModernBertForSequenceClassification
from .models.rmt_resnet import RMTResNetConfig, RMTResNetForImageClassification, RMTResNetModel
from .spectral import (
    CovarianceAccumulator,
    MarchenkoPasturFit,
    eigendecompose,
    fit_marchenko_pastur,
    marchenko_pastur_cdf,
    marchenko_pastur_edges,
    marchenko_pastur_pdf,
)
from .spectral_report import spectral_report
from .trainer import RMTKDTrainer

__version__ = "0.1.0"

_TEXT_AUTO_CLASSES = (  # in the order of FAMILY_CLASSES' entries
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoModelForQuestionAnswering,
)
_RESNET_AUTO_CLASSES = {
    "AutoModel": (AutoModel, RMTResNetModel),
    "AutoModelForImageClassification": (AutoModelForImageClassification, RMTResNetForImageClassification),
}


def _register_auto_classes() -> None:
    for model_classes in [*FAMILY_CLASSES.values(), MODERNBERT_CLASSES]:
        config_class = model_classes[0].config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class()
        for auto_class, model_class in zip(_TEXT_AUTO_CLASSES, model_classes, strict=True):
            auto_class.register(config_class, model_class, exist_ok=True)
            # save_pretrained then copies the modeling files beside the weights (trust_remote_code loading).
            model_class.register_for_auto_class(auto_class.__name__)
    AutoConfig.register(RMTResNetConfig.model_type, RMTResNetConfig, exist_ok=True)
    RMTResNetConfig.register_for_auto_class()
    for auto_name, (auto_class, model_class) in _RESNET_AUTO_CLASSES.items():
        auto_class.register(RMTResNetConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_name)


_register_auto_classes()

__all__ = [
    "ActivationTap",
    "CompressionReport",
    "CovarianceAccumulator",
    "MarchenkoPasturFit",
    "RMTBertConfig",
    "RMTBertForQuestionAnswering",
    "RMTBertForSequenceClassification",
    "RMTBertForTokenClassification",
    "RMTBertModel",
    "RMTElectraConfig",
    "RMTElectraForSequenceClassification",
    "RMTKDConfig",
    "RMTModernBertConfig",
    "RMTModernBertForSequenceClassification",
    "RMTKDTrainer",
    "RMTResNetConfig",
    "RMTResNetForImageClassification",
    "RMTResNetModel",
    "RMTRobertaConfig",
    "RMTRobertaForSequenceClassification",
    "RMTXLMRobertaConfig",
    "RMTXLMRobertaForSequenceClassification",
    "analyse_sites",
    "collect_covariances",
    "compress_model",
    "distillation_loss",
    "export_onnx",
    "eigendecompose",
    "fit_marchenko_pastur",
    "format_widths_table",
    "marchenko_pastur_cdf",
    "marchenko_pastur_edges",
    "marchenko_pastur_pdf",
    "plan_widths",
    "spectral_report",
]
