"""PyTorch ResNet with per-block channel widths chosen by RMT-KD.

This file travels with every compressed checkpoint so that ``trust_remote_code=True`` loads it without
``rmt_kd_hf`` installed: it imports only torch, the public transformers API and its sibling config.

The modules and parameter names are those of transformers' ``ResNetModel`` (a teacher's state dict loads as is);
only the widths are free: the stem writes ``embedding_size`` channels, stage ``s`` carries a residual stream of
``hidden_sizes[s]`` channels, and each block's inner convolutions have ``inner_sizes[block]`` output channels.
Images are ``(batch, num_channels, height, width)``.
"""

import math

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithNoAttention,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

from .configuration_rmt_resnet import RMTResNetConfig


class RMTResNetConvLayer(nn.Module):
    """Convolution (no bias, "same" padding) → BatchNorm → activation (``None``: none)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, activation="relu"):
        super().__init__()
        self.convolution = nn.Conv2d(
            in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.normalization = nn.BatchNorm2d(out_channels)
        self.activation = ACT2FN[activation] if activation is not None else nn.Identity()

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(hidden_state)))


class RMTResNetEmbeddings(nn.Module):
    """The stem: a 7x7 stride-2 convolution to ``embedding_size`` channels, then a 3x3 stride-2 max pool."""

    def __init__(self, config: RMTResNetConfig):
        super().__init__()
        self.embedder = RMTResNetConvLayer(
            config.num_channels, config.embedding_size, kernel_size=7, stride=2, activation=config.hidden_act
        )
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.num_channels = config.num_channels

    def forward(self, pixel_values: torch.Tensor | None) -> torch.Tensor:
        if pixel_values is None:
            raise ValueError(
                "pixel_values is required: pass batches of images as `pixel_values` (batch, channels, height, width), "
                "as an image processor returns them."
            )
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.num_channels}, height, width) (config.num_channels = "
                f"{self.num_channels}), got shape {tuple(pixel_values.shape)}."
            )
        return self.pooler(self.embedder(pixel_values))


class RMTResNetShortCut(nn.Module):
    """1x1 convolution + BatchNorm that maps a stage's input stream onto its own stream."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
        self.normalization = nn.BatchNorm2d(out_channels)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.convolution(hidden_state))


class RMTResNetBlock(nn.Module):
    """A residual block: ``activation(layer(x) + shortcut(x))``.

    Bottleneck blocks: 1x1 (``inner_sizes[0]``) → 3x3 (``inner_sizes[1]``) → 1x1 (``out_channels``); basic blocks:
    3x3 (``inner_sizes[0]``) → 3x3 (``out_channels``).
    """

    def __init__(
        self,
        config: RMTResNetConfig,
        in_channels: int,
        out_channels: int,
        inner_sizes: list[int],
        stride: int,
        has_shortcut: bool,
    ):
        super().__init__()
        activation = config.hidden_act
        self.shortcut = RMTResNetShortCut(in_channels, out_channels, stride) if has_shortcut else nn.Identity()
        if config.layer_type == "bottleneck":
            first_stride, second_stride = (stride, 1) if config.downsample_in_bottleneck else (1, stride)
            self.layer = nn.Sequential(
                RMTResNetConvLayer(in_channels, inner_sizes[0], 1, first_stride, activation),
                RMTResNetConvLayer(inner_sizes[0], inner_sizes[1], 3, second_stride, activation),
                RMTResNetConvLayer(inner_sizes[1], out_channels, 1, activation=None),
            )
        else:
            self.layer = nn.Sequential(
                RMTResNetConvLayer(in_channels, inner_sizes[0], 3, stride, activation),
                RMTResNetConvLayer(inner_sizes[0], out_channels, 3, activation=None),
            )
        self.activation = ACT2FN[activation]

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(hidden_state)
        return self.activation(self.layer(hidden_state) + residual)


class RMTResNetStage(nn.Module):
    def __init__(self, config: RMTResNetConfig, stage: int, first_block: int):
        super().__init__()
        in_channels = config.embedding_size if stage == 0 else config.hidden_sizes[stage - 1]
        width = config.hidden_sizes[stage]
        stride = 2 if stage > 0 or config.downsample_in_first_stage else 1
        blocks = []
        for offset in range(config.depths[stage]):
            blocks.append(
                RMTResNetBlock(
                    config,
                    in_channels if offset == 0 else width,
                    width,
                    config.inner_sizes[first_block + offset],
                    stride if offset == 0 else 1,
                    has_shortcut=offset == 0 and config.shortcut_stages[stage],
                )
            )
        self.layers = nn.Sequential(*blocks)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden_state)


class RMTResNetEncoder(nn.Module):
    def __init__(self, config: RMTResNetConfig):
        super().__init__()
        first_blocks = [sum(config.depths[:stage]) for stage in range(len(config.depths))]
        self.stages = nn.ModuleList(
            RMTResNetStage(config, stage, first_block) for stage, first_block in enumerate(first_blocks)
        )

    def forward(self, hidden_state: torch.Tensor, output_hidden_states: bool = False):
        hidden_states = (hidden_state,) if output_hidden_states else None
        for stage in self.stages:
            hidden_state = stage(hidden_state)
            if output_hidden_states:
                hidden_states = hidden_states + (hidden_state,)
        return BaseModelOutputWithNoAttention(last_hidden_state=hidden_state, hidden_states=hidden_states)


class RMTResNetPreTrainedModel(PreTrainedModel):
    config_class = RMTResNetConfig
    base_model_prefix = "resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["RMTResNetConvLayer", "RMTResNetShortCut"]

    def _format_output(self, output, return_dict: bool | None):
        """A ``ModelOutput``, or its tuple when ``return_dict`` (or the config's default) is False."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def _init_weights(self, module):
        """The teacher's initialisation (He-normal convolutions), for tensors ``from_pretrained`` did not load."""
        if isinstance(module, nn.Conv2d):
            _fill_unless_loaded(module.weight, nn.init.kaiming_normal_(torch.empty_like(module.weight), mode="fan_out"))
        elif isinstance(module, nn.Linear):
            bound = 1 / math.sqrt(module.in_features) if module.in_features > 0 else 0
            _fill_unless_loaded(module.weight, torch.empty_like(module.weight).uniform_(-bound, bound))
            if module.bias is not None:
                _fill_unless_loaded(module.bias, torch.empty_like(module.bias).uniform_(-bound, bound))
        elif isinstance(module, nn.BatchNorm2d):
            _fill_unless_loaded(module.weight, torch.ones_like(module.weight))
            _fill_unless_loaded(module.bias, torch.zeros_like(module.bias))
            _fill_unless_loaded(module.running_mean, torch.zeros_like(module.running_mean))
            _fill_unless_loaded(module.running_var, torch.ones_like(module.running_var))


def _fill_unless_loaded(tensor: torch.Tensor, value: torch.Tensor) -> None:
    # from_pretrained marks loaded tensors; initialisation must not overwrite them.
    if not getattr(tensor, "_is_hf_initialized", False):
        tensor.copy_(value)


class RMTResNetModel(RMTResNetPreTrainedModel):
    def __init__(self, config: RMTResNetConfig):
        super().__init__(config)
        self.embedder = RMTResNetEmbeddings(config)
        self.encoder = RMTResNetEncoder(config)
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPoolingAndNoAttention:
        """Returns ``last_hidden_state`` (batch, hidden_sizes[-1], h, w) and ``pooler_output``
        (batch, hidden_sizes[-1], 1, 1); ``hidden_states`` are the stem output and every stage's output."""
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        encoder_output = self.encoder(self.embedder(pixel_values), output_hidden_states)
        last_hidden_state = encoder_output.last_hidden_state
        output = BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last_hidden_state,
            pooler_output=self.pooler(last_hidden_state),
            hidden_states=encoder_output.hidden_states,
        )
        return self._format_output(output, return_dict)


def _classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return MSELoss()(logits.squeeze(), labels.squeeze()) if num_labels == 1 else MSELoss()(logits, labels)
    if config.problem_type == "single_label_classification":
        return CrossEntropyLoss()(logits.view(-1, num_labels), labels.view(-1))
    return BCEWithLogitsLoss()(logits, labels)


class RMTResNetForImageClassification(RMTResNetPreTrainedModel):
    def __init__(self, config: RMTResNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.resnet = RMTResNetModel(config)
        head = nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.classifier = nn.Sequential(nn.Flatten(), head)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | ImageClassifierOutputWithNoAttention:
        """``logits`` (batch, num_labels); ``loss`` when ``labels`` (batch,) are given."""
        outputs = self.resnet(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = _classification_loss(self.config, logits, labels) if labels is not None else None
        output = ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return self._format_output(output, return_dict)


__all__ = [
    "RMTResNetForImageClassification",
    "RMTResNetModel",
    "RMTResNetPreTrainedModel",
]
