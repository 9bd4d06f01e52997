"""Configuration of a ResNet whose channel widths were cut by RMT-KD.

This file travels with every compressed checkpoint (``trust_remote_code=True``): it imports nothing
but ``transformers``.
"""

from transformers import ResNetConfig

# Written into every config so that `trust_remote_code=True` finds the classes without rmt_kd_hf installed.
AUTO_MAP = {
    "AutoConfig": "configuration_rmt_resnet.RMTResNetConfig",
    "AutoModel": "modeling_rmt_resnet.RMTResNetModel",
    "AutoModelForImageClassification": "modeling_rmt_resnet.RMTResNetForImageClassification",
}

# Bumped whenever the meaning of a field or a weight changes; loaders refuse newer versions.
RMT_RESNET_FORMAT_VERSION = 1


class RMTResNetConfig(ResNetConfig):
    r"""
    A `ResNetConfig` whose widths may differ per block, as RMT-KD chose them.

    `embedding_size` is the stem's output width and `hidden_sizes[s]` the width of stage `s`'s residual stream (the
    channels every block of the stage reads and adds to). Inside each block the widths are free:

    Args:
        inner_sizes (`list[list[int]]`): one entry per block (stages in order, blocks in order): the output widths of
            the block's inner convolutions: `[conv1, conv2]` for bottleneck blocks, `[conv1]` for basic blocks.
            Default: the teacher's (`hidden_sizes[s] // 4` for bottleneck blocks, `hidden_sizes[s]` for basic).
        shortcut_stages (`list[bool]`): whether the first block of each stage projects its shortcut (1x1 conv +
            BatchNorm). Fixed by the teacher: cutting widths never adds or removes a shortcut.
        rmt_kd_format_version (`int`): version of this checkpoint format.
    """

    model_type = "rmt_resnet"

    inner_sizes: list[list[int]] | None = None
    shortcut_stages: list[bool] | None = None
    rmt_kd_format_version: int = RMT_RESNET_FORMAT_VERSION

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.depths = list(self.depths)
        if self.inner_sizes is None:
            self.inner_sizes = [
                self._default_inner_sizes(width)
                for width, depth in zip(self.hidden_sizes, self.depths, strict=False)  # lengths: _check_widths
                for _ in range(depth)
            ]
        if self.shortcut_stages is None:
            inputs = [self.embedding_size, *self.hidden_sizes[:-1]]
            self.shortcut_stages = [
                stage > 0 or self.downsample_in_first_stage or inputs[stage] != width
                for stage, width in enumerate(self.hidden_sizes)
            ]
        self.inner_sizes = [[int(width) for width in block] for block in self.inner_sizes]
        self.shortcut_stages = [bool(flag) for flag in self.shortcut_stages]
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self._check_widths()

    def _default_inner_sizes(self, width: int) -> list[int]:
        return [width // 4, width // 4] if self.layer_type == "bottleneck" else [width]

    def _check_widths(self) -> None:
        if self.rmt_kd_format_version > RMT_RESNET_FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses rmt_resnet format version {self.rmt_kd_format_version}, newer than the "
                f"{RMT_RESNET_FORMAT_VERSION} this code reads: upgrade rmt-kd-hf (pip install -U rmt-kd-hf)."
            )
        num_stages, num_blocks = len(self.depths), sum(self.depths)
        inner_per_block = 2 if self.layer_type == "bottleneck" else 1
        if len(self.hidden_sizes) != num_stages or len(self.shortcut_stages) != num_stages:
            raise ValueError(
                f"hidden_sizes and shortcut_stages need one entry per stage ({num_stages}), got "
                f"{len(self.hidden_sizes)} and {len(self.shortcut_stages)}"
            )
        if len(self.inner_sizes) != num_blocks or any(len(block) != inner_per_block for block in self.inner_sizes):
            raise ValueError(
                f"inner_sizes needs {num_blocks} blocks of {inner_per_block} widths ({self.layer_type} blocks), "
                f"got {self.inner_sizes}"
            )
        widths = [self.embedding_size, *self.hidden_sizes, *(w for block in self.inner_sizes for w in block)]
        if any(int(width) < 1 for width in widths):
            raise ValueError(
                f"every width must be >= 1, got embedding_size={self.embedding_size}, "
                f"hidden_sizes={self.hidden_sizes}, inner_sizes={self.inner_sizes}"
            )


__all__ = ["AUTO_MAP", "RMTResNetConfig", "RMT_RESNET_FORMAT_VERSION"]
