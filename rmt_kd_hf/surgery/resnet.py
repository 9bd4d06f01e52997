"""RMT-KD surgery for transformers' ResNets (``ResNetModel``, ``ResNetForImageClassification``; bottleneck and
basic blocks) and plain timm ResNets in ``TimmWrapperForImageClassification`` (see ``timm_resnet``).

A teacher is first re-expressed as an ``RMTResNet*`` model (same modules and weights, free widths; ``prepare``).
Every width is then cut by *channel selection*, which commutes with BatchNorm, ReLU, max pooling and the residual
additions, so the kept channels stay exact until a dropped one would have been read (docs/design.md §6):

* sites of kind ``"channels"``: the inner convolution outputs of every block (``block.{b}.conv{i}``), the stem
  output (``stem``) and the residual stream of every stage (``stage.{s}``; a stage without a projection shortcut
  shares the stream, and the site, of its input);
* activations are read per channel over batch and spatial positions (n = images x height x width);
* kept channels: pivoted QR on the top-k eigenvectors of the site's covariance (``select_neurons``);
* every reader of a cut tensor gets the least-squares reconstruction of the dropped channels from the kept ones,
  fitted on the covariance at its own input: ``W' = W C`` folded into the next convolution (or the classifier), the
  intercept ``W c0`` into the next BatchNorm's ``running_mean`` (exact for 1x1 convolutions, inexact at the
  zero-padded border of 3x3 ones) or the classifier bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import ResNetForImageClassification, ResNetModel

from ..calibration import ActivationTap
from ..models.rmt_resnet import (
    RMTResNetConfig,
    RMTResNetForImageClassification,
    RMTResNetModel,
    RMTResNetPreTrainedModel,
)
from ..spectral import CovarianceAccumulator
from .base import Site, SiteAnalysis, least_squares_compensation, select_neurons
from .timm_resnet import convert_timm_resnet_to_rmt, is_timm_resnet

TEACHER_TO_RMT = {ResNetModel: RMTResNetModel, ResNetForImageClassification: RMTResNetForImageClassification}
RMT_CLASSES = tuple(TEACHER_TO_RMT.values())
DEFAULT_IMAGE_SIZE = 224


def is_resnet_family(model: nn.Module) -> bool:
    """transformers' ResNets, their ``RMTResNet*`` forms, and timm ResNets in ``TimmWrapperForImageClassification``."""
    return type(model) in TEACHER_TO_RMT or isinstance(model, RMT_CLASSES) or is_timm_resnet(model)


def _prefix(model: nn.Module) -> str:
    return "" if isinstance(model, (ResNetModel, RMTResNetModel)) else "resnet."


def convert_resnet_to_rmt(model: nn.Module) -> RMTResNetPreTrainedModel:
    """Exact re-expression of a ``ResNet*`` model as an ``RMTResNet*`` model (same parameter names and values)."""
    if isinstance(model, RMT_CLASSES):
        return model
    if is_timm_resnet(model):
        return convert_timm_resnet_to_rmt(model)
    rmt_class = TEACHER_TO_RMT.get(type(model))
    if rmt_class is None:
        supported = ", ".join(cls.__name__ for cls in TEACHER_TO_RMT)
        raise ValueError(f"RMT-KD's ResNet surgery does not support {type(model).__name__}; supported: {supported}.")
    if not isinstance(model.config.hidden_act, str):
        raise ValueError("hidden_act must be a string name (e.g. 'relu') so the compressed config can save it.")
    teacher_fields = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"):
        teacher_fields.pop(key, None)
    config = RMTResNetConfig(**teacher_fields)
    config.architectures = [rmt_class.__name__]
    parameter = next(model.parameters())
    student = rmt_class(config).to(dtype=parameter.dtype, device=parameter.device)
    student.load_state_dict(model.state_dict(), strict=True)
    return student.train(model.training)


@dataclass(frozen=True)
class _Block:
    index: int  # global, stages in order
    stage: int
    path: str  # module path of the block, without the model prefix
    num_inner: int  # inner convolutions whose width is free (2 bottleneck, 1 basic)
    has_shortcut: bool


def _blocks(config: RMTResNetConfig) -> list[_Block]:
    blocks, index = [], 0
    num_inner = 2 if config.layer_type == "bottleneck" else 1
    for stage, depth in enumerate(config.depths):
        for offset in range(depth):
            has_shortcut = offset == 0 and config.shortcut_stages[stage]
            blocks.append(_Block(index, stage, f"encoder.stages.{stage}.layers.{offset}", num_inner, has_shortcut))
            index += 1
    return blocks


def stream_sites(config: RMTResNetConfig) -> list[str]:
    """Stream site of each stage: ``stage.{s}``, or its input's site when stage ``s`` has no projection shortcut."""
    names, current = [], "stem"
    for stage, has_shortcut in enumerate(config.shortcut_stages):
        current = f"stage.{stage}" if has_shortcut else current
        names.append(current)
    return names


def resnet_taps(model: RMTResNetPreTrainedModel) -> list[ActivationTap]:
    """The stem output, every block's output, and every inner convolution's output (after its activation)."""
    prefix = _prefix(model)
    taps = [ActivationTap("stem", f"{prefix}embedder", "output", feature_dim=1, masked=False)]
    for block in _blocks(model.config):
        for inner in range(block.num_inner):
            module = f"{prefix}{block.path}.layer.{inner}"
            taps.append(ActivationTap(f"block.{block.index}.conv{inner + 1}", module, "output", 1, False))
        taps.append(ActivationTap(f"block.{block.index}.output", f"{prefix}{block.path}", "output", 1, False))
    return taps


@dataclass
class ChannelSite(Site):
    """A ``"channels"`` site plus the statistics of every tensor that carries its channels.

    Attributes:
        points: ``{tensor name: (covariance (dim, dim), mean (dim,))}``, float64, uncentred; the readers of each
            tensor are compensated with its own statistics.
    """

    points: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)


def _trace_normalised(covariance: torch.Tensor) -> torch.Tensor:
    return covariance / covariance.trace().clamp_min(1e-300)


def _statistics(accumulator: CovarianceAccumulator) -> tuple[torch.Tensor, torch.Tensor]:
    return accumulator.covariance(), accumulator.mean()


def resnet_sites(model: RMTResNetPreTrainedModel, accumulators: dict[str, CovarianceAccumulator]) -> list[Site]:
    """Stream sites (stem, stages) and inner-channel sites, in forward order.

    A stream site's covariance is the sum of the trace-normalised covariances of every tensor of the stream (the
    stem output or the block outputs of its stages): one channel subset must serve them all.
    """
    config = model.config
    streams = {name: [point for point, _, _ in points] for name, points in _stream_points(config).items()}
    sites = []
    for name, points in streams.items():
        covariance = sum(_trace_normalised(accumulators[point].covariance()) for point in points)
        statistics = {point: _statistics(accumulators[point]) for point in points}
        sites.append(ChannelSite(name, "channels", covariance, accumulators[points[0]].num_samples, points=statistics))
    for block in _blocks(config):
        for inner in range(block.num_inner):
            name = f"block.{block.index}.conv{inner + 1}"
            covariance, mean = _statistics(accumulators[name])
            num_samples = accumulators[name].num_samples
            sites.append(
                ChannelSite(name, "channels", covariance, num_samples, mean, points={name: (covariance, mean)})
            )
    return sites


def _stream_points(config: RMTResNetConfig) -> dict[str, list[tuple[str, list[str], list[str]]]]:
    """Per stream site: ``(tensor, readers, writers)`` for every tensor of the stream, in forward order.

    ``tensor`` names the calibration tap, ``writers`` the conv layers (conv + BatchNorm) that write its channels,
    ``readers`` the conv layers (or ``"classifier"``) that read it.
    """
    stream_of_stage = stream_sites(config)
    streams: dict[str, list[list]] = {"stem": [["stem", [], ["embedder.embedder"]]]}
    previous = "stem"  # the stream holding the tensor the next block reads
    for block in _blocks(config):
        readers = [f"{block.path}.layer.0"] + ([f"{block.path}.shortcut"] if block.has_shortcut else [])
        streams[previous][-1][1].extend(readers)
        writers = [f"{block.path}.layer.{block.num_inner}"] + ([f"{block.path}.shortcut"] if block.has_shortcut else [])
        previous = stream_of_stage[block.stage]
        streams.setdefault(previous, []).append([f"block.{block.index}.output", [], writers])
    streams[previous][-1][1].append("classifier")
    return {name: [tuple(point) for point in points] for name, points in streams.items()}


class _ChannelRewriter:
    """Cuts channels in a float64 copy of an ``RMTResNet*`` state dict: compensate every reader, then select."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str):
        self.state = {name: tensor.detach().cpu().to(torch.float64).clone() for name, tensor in state.items()}
        self.prefix = prefix
        self.selections: list[tuple[str, torch.Tensor]] = []

    def _key(self, name: str) -> str:
        return self.prefix + name

    def compensate_conv(self, conv_layer: str, mixing: torch.Tensor, intercept: torch.Tensor) -> None:
        """``conv_layer`` (conv + BatchNorm) reads the kept channels: ``W' = W C``, ``μ' = μ − Σ_hw W c0``.

        ``mixing`` is (in_channels, kept), ``intercept`` (in_channels,).
        """
        weight_key = self._key(f"{conv_layer}.convolution.weight")
        weight = self.state[weight_key]  # (out, in, kh, kw)
        self.state[weight_key] = torch.einsum("oihw,ik->okhw", weight, mixing)
        mean_key = self._key(f"{conv_layer}.normalization.running_mean")
        self.state[mean_key] = self.state[mean_key] - torch.einsum("oihw,i->o", weight, intercept)

    def compensate_linear(self, linear: str, mixing: torch.Tensor, intercept: torch.Tensor) -> None:
        """``linear`` (a head outside the base model: no prefix) reads the kept channels: ``W' = W C``,
        ``b' = b + W c0``."""
        weight = self.state[f"{linear}.weight"]
        self.state[f"{linear}.weight"] = weight @ mixing
        self.state[f"{linear}.bias"] = self.state[f"{linear}.bias"] + weight @ intercept

    def select_outputs(self, conv_layer: str, kept: torch.Tensor) -> None:
        """``conv_layer`` (conv + BatchNorm) writes only the ``kept`` channels (applied in ``finish``)."""
        self.selections.append((conv_layer, kept))

    def finish(self) -> dict[str, torch.Tensor]:
        parts = ["convolution.weight"] + [
            f"normalization.{part}" for part in ("weight", "bias", "running_mean", "running_var")
        ]
        for conv_layer, kept in self.selections:
            for part in parts:
                key = self._key(f"{conv_layer}.{part}")
                self.state[key] = self.state[key][kept]
        return self.state


def _readers_and_writers(config: RMTResNetConfig) -> dict[str, list[tuple[str, list[str], list[str]]]]:
    """``_stream_points`` plus the inner sites: every site's tensors with their readers and writers."""
    sites = _stream_points(config)
    for block in _blocks(config):
        for inner in range(block.num_inner):
            name = f"block.{block.index}.conv{inner + 1}"
            sites[name] = [(name, [f"{block.path}.layer.{inner + 1}"], [f"{block.path}.layer.{inner}"])]
    return sites


def apply_resnet_widths(model: RMTResNetPreTrainedModel, analyses: dict[str, SiteAnalysis]) -> RMTResNetPreTrainedModel:
    """A new model of the same class whose widths are ``analyses[site].kept_width``.

    The kept channels of each site are chosen by ``select_neurons``; every reader of each of the site's tensors gets
    the least-squares compensation fitted on that tensor's statistics (``ChannelSite.points``).
    """
    config = model.config
    has_classifier = isinstance(model, RMTResNetForImageClassification) and config.num_labels > 0
    rewriter = _ChannelRewriter(model.state_dict(), _prefix(model))
    for name, points in _readers_and_writers(config).items():
        analysis = analyses[name]
        kept = select_neurons(analysis, analysis.kept_width)
        analysis.extra["kept_channels"] = kept.tolist()
        for tensor, readers, writers in points:
            covariance, mean = analysis.site.points[tensor]
            mixing, intercept = least_squares_compensation(
                covariance.numpy(), mean.numpy(), kept, ridge=analysis.extra.get("ridge", 1e-8)
            )
            mixing, intercept = torch.from_numpy(mixing), torch.from_numpy(intercept)
            for reader in readers:
                if reader != "classifier":
                    rewriter.compensate_conv(reader, mixing, intercept)
                elif has_classifier:  # reads the average-pooled stream, which commutes with the affine map
                    rewriter.compensate_linear("classifier.1", mixing, intercept)
            for writer in writers:
                rewriter.select_outputs(writer, torch.from_numpy(kept))
    state = rewriter.finish()
    widths = {name: analysis.kept_width for name, analysis in analyses.items()}
    compressed = type(model)(compressed_config(model, widths))
    original = model.state_dict()
    compressed.load_state_dict({name: tensor.to(original[name].dtype) for name, tensor in state.items()}, strict=True)
    compressed.to(next(model.parameters()).device)
    return compressed.train(model.training)


def compressed_config(model: RMTResNetPreTrainedModel, widths: dict[str, int]) -> RMTResNetConfig:
    """The config of ``model`` cut to ``widths`` (site name -> kept width)."""
    config = RMTResNetConfig.from_dict(model.config.to_dict())
    stream_of_stage = stream_sites(config)
    config.embedding_size = widths["stem"]
    config.hidden_sizes = [widths[name] for name in stream_of_stage]
    config.inner_sizes = [
        [widths[f"block.{block.index}.conv{inner + 1}"] for inner in range(block.num_inner)]
        for block in _blocks(config)
    ]
    config._check_widths()
    return config


def block_stages(model: RMTResNetPreTrainedModel) -> list[list[str]]:
    """Sites grouped shallow to deep: the stem, then per stage each block's inner sites and the stage's stream."""
    config = model.config
    stream_of_stage = stream_sites(config)
    blocks = _blocks(config)
    stages = [["stem"]]
    for block in blocks:
        stages.append([f"block.{block.index}.conv{inner + 1}" for inner in range(block.num_inner)])
        is_last_of_stage = block is blocks[-1] or blocks[block.index + 1].stage != block.stage
        if is_last_of_stage and stream_of_stage[block.stage] == f"stage.{block.stage}":
            stages.append([f"stage.{block.stage}"])
    return stages


class ResNetSurgery:
    """``ArchitectureSurgery`` for transformers' ResNets."""

    name = "resnet"

    def prepare(self, model: nn.Module) -> RMTResNetPreTrainedModel:
        return convert_resnet_to_rmt(model)

    def taps(self, model: RMTResNetPreTrainedModel) -> list[ActivationTap]:
        return resnet_taps(model)

    def sites(self, model, accumulators) -> list[Site]:
        return resnet_sites(model, accumulators)

    def apply(self, model, analyses) -> RMTResNetPreTrainedModel:
        return apply_resnet_widths(model, analyses)

    def compressed_config(self, model, widths: dict[str, int]) -> RMTResNetConfig:
        return compressed_config(model, widths)

    def stages(self, model) -> list[list[str]]:
        return block_stages(model)

    def widths(self, model) -> dict:
        config = model.config
        return {
            "embedding_size": config.embedding_size,
            "hidden_sizes": list(config.hidden_sizes),
            "inner_sizes": [list(block) for block in config.inner_sizes],
        }

    def example_inputs(self, model, batch_size: int, size: int | None = None) -> dict[str, torch.Tensor]:
        """Random ``pixel_values`` (batch_size, num_channels, size, size); ``size`` defaults to 224."""
        side = DEFAULT_IMAGE_SIZE if size is None or size < 1 else size
        num_channels = model.timm_model.conv1.in_channels if is_timm_resnet(model) else model.config.num_channels
        generator = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(batch_size, num_channels, side, side, generator=generator)}


__all__ = [
    "ChannelSite",
    "ResNetSurgery",
    "apply_resnet_widths",
    "convert_resnet_to_rmt",
    "is_resnet_family",
    "resnet_sites",
    "resnet_taps",
]
