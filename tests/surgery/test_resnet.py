import numpy as np
import pytest
import torch
from transformers import ConvNextConfig, ConvNextForImageClassification, ResNetBackbone, ResNetForImageClassification

from rmt_kd_hf import RMTResNetForImageClassification, RMTResNetModel, compress_model
from rmt_kd_hf.surgery import get_surgery
from rmt_kd_hf.surgery.resnet import ResNetSurgery, convert_resnet_to_rmt

from ..resnet_fixtures import ResNetModel, image_batches, outputs_of, single_thread, tiny_resnet  # noqa: F401

# (layer type, stem width): a stem as wide as stage 0 means no projection shortcut there (stem and stage 0 share
# one stream).
VARIANTS = [("bottleneck", 8), ("bottleneck", 16), ("basic", 8), ("basic", 16)]


@pytest.mark.parametrize("layer_type, embedding_size", VARIANTS)
@pytest.mark.parametrize("model_class", [ResNetForImageClassification, ResNetModel])
def test_keeping_every_channel_reproduces_the_teacher(layer_type, embedding_size, model_class):
    teacher = tiny_resnet(model_class, layer_type=layer_type, embedding_size=embedding_size)
    batches = image_batches()
    student, report = compress_model(teacher, batches, keep_all=True, progress=False)
    assert isinstance(student, (RMTResNetForImageClassification, RMTResNetModel))
    assert all(width == report.analyses[name].site.dim for name, width in report.kept_widths.items())
    for batch in batches[:2]:
        torch.testing.assert_close(outputs_of(student, batch), outputs_of(teacher, batch), atol=1e-5, rtol=0)


def test_sites_follow_the_streams():
    with_shortcut = convert_resnet_to_rmt(tiny_resnet(embedding_size=8))
    without = convert_resnet_to_rmt(tiny_resnet(embedding_size=16))
    surgery = ResNetSurgery()
    _, report = compress_model(with_shortcut, image_batches(2), keep_all=True, progress=False)
    assert set(report.kept_widths) == {"stem", "stage.0", "stage.1", "stage.2"} | {
        f"block.{b}.conv{i}" for b in range(5) for i in (1, 2)
    }
    _, report = compress_model(without, image_batches(2), keep_all=True, progress=False)
    assert "stage.0" not in report.kept_widths  # stage 0 adds to the stem's channels: one site
    for model in (with_shortcut, without):
        names = [name for stage in surgery.stages(model) for name in stage]
        assert len(names) == len(set(names))
    stages = surgery.stages(with_shortcut)
    assert stages[0] == ["stem"] and stages[1] == ["block.0.conv1", "block.0.conv2"] and ["stage.0"] in stages


def test_duplicated_channels_are_removed_without_changing_the_logits():
    """Channels that copy kept ones are rebuilt exactly by the least-squares compensation (1x1 reader, interior)."""
    teacher = tiny_resnet()
    inner = teacher.resnet.encoder.stages[0].layers[0].layer[1]  # block 0, conv2: 4 channels, read by a 1x1 conv
    with torch.no_grad():
        inner.convolution.weight[2:] = inner.convolution.weight[:2]
        for tensor in (inner.normalization.weight, inner.normalization.bias):
            tensor[2:] = tensor[:2]
        inner.normalization.running_mean[2:] = inner.normalization.running_mean[:2]
        inner.normalization.running_var[2:] = inner.normalization.running_var[:2]
    batches = image_batches()
    student, report = compress_model(teacher, batches, keep_all=True, kept_widths={"block.0.conv2": 2}, progress=False)
    assert student.config.inner_sizes[0] == [4, 2]
    kept = report.analyses["block.0.conv2"].extra["kept_channels"]
    assert len({channel % 2 for channel in kept}) == 2  # one of each identical pair
    torch.testing.assert_close(outputs_of(student, batches[0]), outputs_of(teacher, batches[0]), atol=1e-4, rtol=0)
    # Without the compensation the dropped pair's contribution is simply lost.
    naive = convert_resnet_to_rmt(teacher)
    with torch.no_grad():
        naive.resnet.encoder.stages[0].layers[0].layer[2].convolution.weight[
            :, [c for c in range(4) if c not in kept]
        ] = 0
    assert (outputs_of(naive, batches[0]) - outputs_of(teacher, batches[0])).abs().max() > 1e-2


def test_compression_cuts_widths_and_parameters():
    teacher = tiny_resnet(seed=2)
    batches = image_batches()
    student, report = compress_model(teacher, batches, sigma_quantile=0.6, progress=False)
    config = student.config
    widths = report.kept_widths
    assert config.embedding_size == widths["stem"]
    assert config.hidden_sizes == [widths["stage.0"], widths["stage.1"], widths["stage.2"]]
    assert config.inner_sizes[3] == [widths["block.3.conv1"], widths["block.3.conv2"]]
    assert report.num_parameters_after < 0.8 * report.num_parameters_before
    assert outputs_of(student, batches[0]).shape == (16, 3)
    for analysis in report.analyses.values():
        assert analysis.kept_width == max(1, int((analysis.eigenvalues > analysis.fit.lambda_plus).sum()))
    assert ResNetSurgery().widths(student)["hidden_sizes"] == config.hidden_sizes


def test_compressed_model_can_be_compressed_again():
    batches = image_batches()
    student, _ = compress_model(tiny_resnet(seed=3), batches, sigma_quantile=0.5, progress=False)
    again, report = compress_model(student, batches, keep_all=True, progress=False)
    assert report.kept_widths["stem"] == student.config.embedding_size
    torch.testing.assert_close(outputs_of(again, batches[1]), outputs_of(student, batches[1]), atol=1e-5, rtol=0)


def test_zero_channels_after_the_fit_is_a_clear_error():
    teacher = tiny_resnet()
    with pytest.raises(ValueError, match=r"k = 0.*lower sigma_quantile.*min_width >= 1"):
        compress_model(teacher, image_batches(2), sigma_quantile=0.999, refine=False, min_width=0, progress=False)
    with pytest.raises(ValueError, match=r"kept_widths\['block.0.conv1'\] = 0 is outside 1..4"):
        compress_model(teacher, image_batches(2), kept_widths={"block.0.conv1": 0}, progress=False)


def test_unsupported_and_non_image_models_are_named():
    convnext = ConvNextForImageClassification(
        ConvNextConfig(num_stages=2, depths=[1, 1], hidden_sizes=[8, 16], num_channels=1)
    )
    with pytest.raises(ValueError, match="no surgery for ConvNextForImageClassification.*ResNetForImageClassification"):
        get_surgery(convnext)
    backbone = ResNetBackbone(tiny_resnet().config)
    with pytest.raises(ValueError, match="no surgery for ResNetBackbone"):
        get_surgery(backbone)
    text_batches = [{"input_ids": torch.ones(2, 5, dtype=torch.long)}]
    with pytest.raises(ValueError, match="pixel_values is required"):
        compress_model(tiny_resnet(), text_batches, progress=False)
    wrong_channels = image_batches(1, channels=3)
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 1, height, width\)"):
        compress_model(tiny_resnet(), wrong_channels, progress=False)


def test_example_inputs_are_images_of_the_models_channels():
    model = convert_resnet_to_rmt(tiny_resnet(num_channels=3))
    inputs = ResNetSurgery().example_inputs(model, 2, 32)
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert ResNetSurgery().example_inputs(model, 1)["pixel_values"].shape == (1, 3, 224, 224)
    assert np.isfinite(outputs_of(model, inputs).numpy()).all()
