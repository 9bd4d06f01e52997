"""timm ResNets behind transformers' ``TimmWrapperForImageClassification``, re-expressed as ``RMTResNet`` models.

A plain timm ResNet (7x7 stem + max pool, ``BasicBlock`` or ``Bottleneck`` blocks, 1x1-conv downsampling, ReLU,
BatchNorm, no attention/anti-aliasing/dilation/groups) computes exactly what transformers' ResNet layout computes
(stride in the 3x3 convolution of a bottleneck), so ``convert_timm_resnet_to_rmt`` maps its weights onto an
``RMTResNetForImageClassification`` and the ResNet surgery does the rest. The compressed model is saved as an
``rmt_resnet`` checkpoint: ``from_pretrained`` loads it without timm.

timm is optional: nothing here imports it (modules are recognised by class name and structure).
"""

from __future__ import annotations

from torch import nn

from ..models.rmt_resnet import RMTResNetConfig, RMTResNetForImageClassification

STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


def is_timm_resnet(model: nn.Module) -> bool:
    """A ``TimmWrapperForImageClassification`` around a timm ``ResNet`` (plain or not: see ``timm_resnet_problems``)."""
    return type(model).__name__ == "TimmWrapperForImageClassification" and (
        type(getattr(model, "timm_model", None)).__name__ == "ResNet"
    )


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _block_problems(name: str, block: nn.Module) -> list[str]:
    problems = []
    convs = [module for module in block.children() if isinstance(module, nn.Conv2d)]
    if any(conv.groups != 1 or conv.dilation != (1, 1) for conv in convs):
        problems.append(f"{name}: grouped or dilated convolutions (ResNeXt / output_stride < 32)")
    for attribute in ("se", "aa", "drop_block"):
        if not _is_identity(getattr(block, attribute, None)):
            problems.append(f"{name}.{attribute} is a {type(getattr(block, attribute)).__name__}")
    norms = [getattr(block, name) for name in ("bn1", "bn2", "bn3") if hasattr(block, name)]
    if any(type(norm) is not nn.BatchNorm2d for norm in norms):
        problems.append(f"{name}: normalisation other than BatchNorm2d")
    acts = [getattr(block, name) for name in ("act1", "act2", "act3") if hasattr(block, name)]
    if any(not isinstance(act, nn.ReLU) for act in acts):
        problems.append(f"{name}: activation other than ReLU")
    downsample = block.downsample
    if downsample is not None:
        layers = list(downsample.children()) if isinstance(downsample, nn.Sequential) else [downsample]
        if len(layers) != 2 or not isinstance(layers[0], nn.Conv2d) or layers[0].kernel_size != (1, 1):
            problems.append(f"{name}.downsample is not a 1x1 convolution + BatchNorm (avg_down / deep variants)")
    return problems


def timm_resnet_problems(net: nn.Module) -> list[str]:
    """Why a timm ``ResNet`` is not a plain one this conversion supports (empty list: supported)."""
    problems = []
    if not isinstance(getattr(net, "conv1", None), nn.Conv2d) or net.conv1.kernel_size != (7, 7):
        problems.append("the stem is not one 7x7 convolution (deep stems: stem_type 'deep'/'deep_tiered')")
    if not isinstance(getattr(net, "maxpool", None), nn.MaxPool2d):
        problems.append("the stem has no 3x3 max pool (replace_stem_pool)")
    if not isinstance(getattr(net, "act1", None), nn.ReLU) or not isinstance(getattr(net, "bn1", None), nn.BatchNorm2d):
        problems.append("the stem is not conv + BatchNorm2d + ReLU")
    if (
        type(getattr(net, "global_pool", None)).__name__ != "SelectAdaptivePool2d"
        or getattr(net.global_pool, "pool_type", "avg") != "avg"
    ):
        problems.append("the head does not average-pool")
    if not isinstance(getattr(net, "fc", None), nn.Linear):
        problems.append("the classifier is not one Linear layer")
    for stage in STAGE_NAMES:
        for index, block in enumerate(getattr(net, stage)):
            problems.extend(_block_problems(f"{stage}.{index}", block))
            if getattr(block, "drop_path", None) is not None:
                problems.append(f"{stage}.{index}: drop_path (stochastic depth) is not kept by the conversion")
    return problems


def _rmt_config(model: nn.Module) -> RMTResNetConfig:
    net = model.timm_model
    stages = [list(getattr(net, stage)) for stage in STAGE_NAMES]
    bottleneck = hasattr(stages[0][0], "conv3")
    last_conv = "conv3" if bottleneck else "conv2"
    inner = ("conv1", "conv2") if bottleneck else ("conv1",)
    labels = dict(model.config.id2label or {})
    return RMTResNetConfig(
        num_channels=net.conv1.in_channels,
        embedding_size=net.conv1.out_channels,
        hidden_sizes=[getattr(blocks[-1], last_conv).out_channels for blocks in stages],
        depths=[len(blocks) for blocks in stages],
        layer_type="bottleneck" if bottleneck else "basic",
        hidden_act="relu",
        inner_sizes=[[getattr(block, conv).out_channels for conv in inner] for blocks in stages for block in blocks],
        shortcut_stages=[blocks[0].downsample is not None for blocks in stages],
        num_labels=net.fc.out_features,
        id2label=labels or None,
        label2id={label: index for index, label in labels.items()} if labels else None,
        architectures=[RMTResNetForImageClassification.__name__],
    )


def _conv_bn(state: dict, source: str, target: str, conv: str, norm: str) -> None:
    """Map ``{source}.{conv}`` + ``{source}.{norm}`` onto the ``convolution``/``normalization`` pair at ``target``."""
    state[f"{target}.convolution.weight"] = f"{source}{conv}.weight"
    for part in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        state[f"{target}.normalization.{part}"] = f"{source}{norm}.{part}"


def timm_to_rmt_names(config: RMTResNetConfig) -> dict[str, str]:
    """``{RMTResNet parameter name: timm parameter name}`` for a plain timm ResNet of ``config``'s layout."""
    names: dict[str, str] = {}
    _conv_bn(names, "", "resnet.embedder.embedder", "conv1", "bn1")
    convs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))[: 3 if config.layer_type == "bottleneck" else 2]
    for stage, depth in enumerate(config.depths):
        for index in range(depth):
            source, target = f"{STAGE_NAMES[stage]}.{index}.", f"resnet.encoder.stages.{stage}.layers.{index}"
            for position, (conv, norm) in enumerate(convs):
                _conv_bn(names, source, f"{target}.layer.{position}", conv, norm)
            if index == 0 and config.shortcut_stages[stage]:
                _conv_bn(names, source, f"{target}.shortcut", "downsample.0", "downsample.1")
    names["classifier.1.weight"], names["classifier.1.bias"] = "fc.weight", "fc.bias"
    return names


def convert_timm_resnet_to_rmt(model: nn.Module) -> RMTResNetForImageClassification:
    """Exact re-expression of a ``TimmWrapperForImageClassification`` around a plain timm ResNet."""
    problems = timm_resnet_problems(model.timm_model)
    if problems:
        raise ValueError(
            "RMT-KD converts plain timm ResNets only (7x7 stem, Basic/Bottleneck blocks, 1x1 downsampling, BatchNorm, "
            "ReLU); this one has: " + "; ".join(problems)
        )
    config = _rmt_config(model)
    timm_state = model.timm_model.state_dict()
    parameter = next(model.parameters())
    student = RMTResNetForImageClassification(config).to(dtype=parameter.dtype, device=parameter.device)
    names = timm_to_rmt_names(config)
    state = {target: timm_state[source] for target, source in names.items() if source in timm_state}
    student.load_state_dict(state, strict=True)
    return student.train(model.training)


__all__ = ["convert_timm_resnet_to_rmt", "is_timm_resnet", "timm_resnet_problems", "timm_to_rmt_names"]
