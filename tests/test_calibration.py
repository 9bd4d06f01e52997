import pytest
import torch
from torch import nn

from rmt_kd_hf.calibration import ActivationTap, collect_covariances


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 5)
        self.second = nn.Linear(5, 4)

    def forward(self, inputs_embeds, attention_mask=None):
        return self.second(torch.relu(self.first(inputs_embeds)))


def test_covariance_matches_a_direct_computation_and_skips_padding():
    torch.manual_seed(0)
    model = TwoLayer()
    batches = []
    for _ in range(3):
        mask = torch.ones(4, 7, dtype=torch.long)
        mask[1, 3:] = 0
        mask[3, 5:] = 0
        batches.append({"inputs_embeds": torch.randn(4, 7, 6), "attention_mask": mask, "labels": torch.zeros(4)})
    taps = [ActivationTap("hidden", "first", "output"), ActivationTap("out", "second", "output")]
    accumulators = collect_covariances(model, batches, taps, progress=False)
    with torch.no_grad():
        rows = torch.cat([model.first(b["inputs_embeds"])[b["attention_mask"].bool()] for b in batches]).double()
    assert accumulators["hidden"].num_samples == rows.shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)
    torch.testing.assert_close(accumulators["hidden"].covariance(), rows.T @ rows / rows.shape[0])
    assert accumulators["out"].dim == 4


def test_input_capture_and_channel_axis():
    model = nn.Sequential(nn.Conv2d(3, 5, 1), nn.ReLU())

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, pixel_values):
            return self.body(pixel_values)

    images = torch.randn(2, 3, 4, 4)
    taps = [ActivationTap("channels", "body.1", "input", feature_dim=1, masked=False)]
    accumulators = collect_covariances(Wrapper(), [{"pixel_values": images}], taps, progress=False)
    with torch.no_grad():
        rows = model[0](images).permute(0, 2, 3, 1).reshape(-1, 5).double()
    assert accumulators["channels"].num_samples == 32
    torch.testing.assert_close(accumulators["channels"].covariance(), rows.T @ rows / 32)


def test_non_finite_activations_name_the_tap():
    model = TwoLayer()
    batch = {"inputs_embeds": torch.full((1, 2, 6), float("nan"))}
    with pytest.raises(ValueError, match="non-finite activations in hidden"):
        collect_covariances(model, [batch], [ActivationTap("hidden", "first")], progress=False)
    # hooks are removed even after the error
    assert not model.first._forward_hooks


def test_empty_dataloader_and_wrong_module_names():
    model = TwoLayer()
    with pytest.raises(ValueError, match="no batches"):
        collect_covariances(model, [], [ActivationTap("hidden", "first")], progress=False)
    with pytest.raises(AttributeError):
        collect_covariances(model, [], [ActivationTap("hidden", "missing")], progress=False)
