from .configuration_rmt_resnet import RMT_RESNET_FORMAT_VERSION, RMTResNetConfig
from .modeling_rmt_resnet import RMTResNetForImageClassification, RMTResNetModel, RMTResNetPreTrainedModel

__all__ = [
    "RMT_RESNET_FORMAT_VERSION",
    "RMTResNetConfig",
    "RMTResNetForImageClassification",
    "RMTResNetModel",
    "RMTResNetPreTrainedModel",
]
