"""timm ResNets through TimmWrapperForImageClassification.

The real-timm tests skip when timm is absent (it is an optional extra). A torch-only stand-in with timm's module
names and forward (``TimmLikeResNet``, written from timm's ``models/resnet.py``) checks the weight mapping here.
"""

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageClassification

from rmt_kd_hf import RMTResNetForImageClassification, compress_model
from rmt_kd_hf.surgery.timm_resnet import convert_timm_resnet_to_rmt, is_timm_resnet, timm_resnet_problems

from ..resnet_fixtures import image_batches, single_thread  # noqa: F401


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2, self.drop_block, self.act2, self.aa = nn.BatchNorm2d(planes), nn.Identity(), nn.ReLU(), nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.se, self.act3, self.downsample, self.drop_path = None, nn.ReLU(), downsample, None

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))))
        return self.act3(self.bn3(self.conv3(x)) + shortcut)


class SelectAdaptivePool2d(nn.Module):
    pool_type = "avg"

    def forward(self, x):
        return x.mean((2, 3))


class ResNet(nn.Module):
    def __init__(self, in_chans=1, stem_width=8, channels=(2, 4, 4, 8), layers=(2, 1, 1, 1), num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1, self.act1 = nn.BatchNorm2d(stem_width), nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = stem_width
        for stage, (planes, depth) in enumerate(zip(channels, layers, strict=True)):
            stride = 1 if stage == 0 else 2
            blocks = []
            for index in range(depth):
                downsample = None
                if index == 0 and (stride != 1 or inplanes != planes * 4):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
                    )
                blocks.append(Bottleneck(inplanes, planes, stride if index == 0 else 1, downsample))
                inplanes = planes * 4
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.global_pool, self.fc = SelectAdaptivePool2d(), nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for stage in range(4):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(self.global_pool(x))


class TimmWrapperForImageClassification(nn.Module):
    """Only what the conversion reads: ``timm_model``, ``config.id2label`` and ``logits``."""

    def __init__(self, timm_model):
        super().__init__()
        self.timm_model = timm_model
        self.config = type("Config", (), {"id2label": {0: "a", 1: "b", 2: "c"}})()

    def forward(self, pixel_values):
        return type("Output", (), {"logits": self.timm_model(pixel_values)})()


def test_timm_like_resnet_converts_exactly():
    torch.manual_seed(0)
    net = ResNet()
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 1, 28, 28))  # running statistics that are not 0/1
    wrapper = TimmWrapperForImageClassification(net.eval())
    assert is_timm_resnet(wrapper) and timm_resnet_problems(net) == []
    converted = convert_timm_resnet_to_rmt(wrapper)
    assert converted.config.hidden_sizes == [8, 16, 16, 32] and converted.config.inner_sizes[0] == [2, 2]
    assert converted.config.shortcut_stages == [False, True, True, True]  # stem 8 = 2 * 4: identity shortcut
    assert converted.config.id2label[2] == "c"
    pixels = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(pixel_values=pixels).logits, net(pixels), atol=1e-5, rtol=0)


def test_unsupported_timm_variants_are_named():
    net = ResNet()
    net.layer2[0].se = nn.Sequential(nn.AdaptiveAvgPool2d(1))  # a squeeze-excitation module
    net.layer3[0].act2 = nn.GELU()
    with pytest.raises(ValueError, match=r"plain timm ResNets only.*layer2.0.se is a Sequential.*layer3.0: activation"):
        convert_timm_resnet_to_rmt(TimmWrapperForImageClassification(net))


@pytest.fixture
def timm_wrapper():
    pytest.importorskip("timm")
    from transformers import TimmWrapperConfig
    from transformers import TimmWrapperForImageClassification as RealWrapper

    torch.manual_seed(0)
    model_args = {"layers": (1, 1, 1, 1), "channels": (4, 8, 8, 16), "stem_width": 8, "in_chans": 1}
    config = TimmWrapperConfig(architecture="resnet50", model_args=model_args, num_labels=3)
    model = RealWrapper(config)
    model.train()
    with torch.no_grad():
        model(pixel_values=torch.randn(16, 1, 28, 28))
    return model.eval()


def test_real_timm_resnet_keeps_its_logits_and_saves_as_rmt_resnet(timm_wrapper, tmp_path):
    batches = image_batches()
    student, report = compress_model(timm_wrapper, batches, keep_all=True, progress=False)
    assert isinstance(student, RMTResNetForImageClassification)
    with torch.no_grad():
        expected = timm_wrapper(pixel_values=batches[0]["pixel_values"]).logits
        torch.testing.assert_close(
            student.eval()(pixel_values=batches[0]["pixel_values"]).logits, expected, atol=1e-5, rtol=0
        )
    cut, _ = compress_model(timm_wrapper, batches, sigma_quantile=0.5, progress=False)
    cut.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.model_type == "rmt_resnet"
    with torch.no_grad():
        pixels = batches[1]["pixel_values"]
        assert torch.equal(reloaded.eval()(pixel_values=pixels).logits, cut.eval()(pixel_values=pixels).logits)
