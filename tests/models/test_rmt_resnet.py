import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from rmt_kd_hf import RMTResNetConfig, RMTResNetForImageClassification, RMTResNetModel, compress_model
from rmt_kd_hf.models.rmt_resnet.configuration_rmt_resnet import AUTO_MAP, RMT_RESNET_FORMAT_VERSION

from ..resnet_fixtures import image_batches, outputs_of, single_thread, tiny_resnet, tiny_resnet_config  # noqa: F401


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    batches = image_batches()
    student, _ = compress_model(tiny_resnet(), batches, sigma_quantile=0.6, progress=False)
    directory = tmp_path_factory.mktemp("compressed_resnet")
    student.save_pretrained(directory)
    return student, batches, str(directory)


def config_fields(**overrides) -> dict:
    fields = tiny_resnet_config().to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    return fields | overrides


def test_config_defaults_round_trip_and_validation():
    config = RMTResNetConfig(**config_fields())
    assert config.inner_sizes == [[4, 4], [4, 4], [6, 6], [8, 8], [8, 8]]
    assert config.shortcut_stages == [True, True, True]
    basic = RMTResNetConfig(**config_fields(layer_type="basic", embedding_size=16))
    assert basic.inner_sizes[0] == [16] and basic.shortcut_stages == [False, True, True]
    cut = RMTResNetConfig(**config_fields(inner_sizes=[[1, 2], [3, 4], [5, 6], [7, 8], [9, 1]]))
    reloaded = RMTResNetConfig.from_dict(json.loads(cut.to_json_string()))
    assert reloaded.inner_sizes == cut.inner_sizes and reloaded.auto_map == AUTO_MAP
    with pytest.raises(ValueError, match="inner_sizes needs 5 blocks of 2 widths"):
        RMTResNetConfig(**config_fields(inner_sizes=[[1, 2]]))
    with pytest.raises(ValueError, match="every width must be >= 1"):
        RMTResNetConfig(**config_fields(hidden_sizes=[16, 0, 32]))
    with pytest.raises(ValueError, match="upgrade rmt-kd-hf"):
        RMTResNetConfig(**config_fields(rmt_kd_format_version=RMT_RESNET_FORMAT_VERSION + 1))


def test_save_writes_safetensors_modeling_files_and_auto_map(compressed):
    _, _, directory = compressed
    files = set(os.listdir(directory))
    assert {"config.json", "model.safetensors", "modeling_rmt_resnet.py", "configuration_rmt_resnet.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    saved = json.load(open(os.path.join(directory, "config.json")))
    assert saved["model_type"] == "rmt_resnet" and saved["auto_map"] == AUTO_MAP


def test_auto_classes_load_the_checkpoint_with_identical_logits(compressed):
    student, batches, directory = compressed
    assert isinstance(AutoConfig.from_pretrained(directory), RMTResNetConfig)
    reloaded = AutoModelForImageClassification.from_pretrained(directory)
    assert isinstance(reloaded, RMTResNetForImageClassification)
    assert reloaded.config.inner_sizes == student.config.inner_sizes
    for batch in batches[:2]:
        assert torch.equal(outputs_of(reloaded, batch), outputs_of(student, batch))
    base = AutoModel.from_pretrained(directory)
    assert isinstance(base, RMTResNetModel)
    running_mean = "encoder.stages.1.layers.0.shortcut.normalization.running_mean"
    assert torch.equal(base.state_dict()[running_mean], student.resnet.state_dict()[running_mean])


def test_trust_remote_code_loads_without_the_package(compressed, tmp_path):
    student, batches, directory = compressed
    torch.save(batches[0]["pixel_values"], tmp_path / "pixels.pt")
    script = f"""
import sys
sys.modules["rmt_kd_hf"] = None  # any import of the package now fails
import torch
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({directory!r}, trust_remote_code=True).eval()
assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
pixels = torch.load({str(tmp_path / "pixels.pt")!r})
with torch.no_grad():
    torch.save(model(pixel_values=pixels).logits, {str(tmp_path / "logits.pt")!r})
"""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), outputs_of(student, batches[0]))


def test_forward_options(compressed):
    student, batches, _ = compressed
    batch = batches[0]
    student.eval()
    with torch.no_grad():
        output = student(pixel_values=batch["pixel_values"], labels=batch["labels"], output_hidden_states=True)
        as_tuple = student(pixel_values=batch["pixel_values"], return_dict=False)
    assert output.loss is not None and torch.isfinite(output.loss)
    config = student.config
    assert [h.shape[1] for h in output.hidden_states] == [config.embedding_size, *config.hidden_sizes]
    assert output.hidden_states[-1].shape[-2:] == (2, 2)  # 28 -> 7 (stem), stages 7, 4, 2
    assert torch.equal(as_tuple[0], output.logits)
