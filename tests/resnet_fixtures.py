"""Tiny random ResNets (with non-trivial BatchNorm statistics) and image batches for the ResNet tests."""

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny convolutions run fastest on one thread, and do not thrash when other jobs share the cores.

    Import it into a test module to apply it there (autouse)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_resnet_config(**overrides) -> ResNetConfig:
    fields = dict(
        num_channels=1,
        embedding_size=8,
        hidden_sizes=[16, 24, 32],
        depths=[2, 1, 2],
        layer_type="bottleneck",
        num_labels=3,
    )
    fields.update(overrides)
    return ResNetConfig(**fields)


def image_batches(num_batches: int = 4, batch_size: int = 16, side: int = 28, channels: int = 1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(batch_size, channels, side, side, generator=generator),
            "labels": torch.randint(0, 3, (batch_size,), generator=generator),
        }
        for _ in range(num_batches)
    ]


def tiny_resnet(model_class=ResNetForImageClassification, seed: int = 0, **overrides):
    """A random ResNet whose BatchNorms hold running statistics of random images (not the 0/1 of a fresh model)."""
    torch.manual_seed(seed)
    model = model_class(tiny_resnet_config(**overrides))
    model.train()
    with torch.no_grad():
        for batch in image_batches(3, seed=seed + 100, channels=model.config.num_channels):
            model(pixel_values=batch["pixel_values"])
    return model.eval()


def outputs_of(model, batch) -> torch.Tensor:
    """Logits of classifiers, the pooled features of base models."""
    model.eval()
    with torch.no_grad():
        output = model(pixel_values=batch["pixel_values"])
    return output.logits if hasattr(output, "logits") else output.pooler_output.flatten(1)


__all__ = ["ResNetModel", "image_batches", "outputs_of", "single_thread", "tiny_resnet", "tiny_resnet_config"]
