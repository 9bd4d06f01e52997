import pytest
import torch

from rmt_kd_hf.augmentation import mask_random_tokens

CLS, SEP, PAD, MASK = 101, 102, 0, 103


def batch(rows: int = 64, length: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 2000, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    lengths = torch.randint(5, length, (rows,), generator=generator)
    for row, real in enumerate(lengths.tolist()):
        input_ids[row, 0], input_ids[row, real - 1] = CLS, SEP
        input_ids[row, real:], attention_mask[row, real:] = PAD, 0
    return input_ids, attention_mask


def test_masks_about_the_asked_share_of_real_words_and_never_specials_or_padding():
    input_ids, attention_mask = batch()
    torch.manual_seed(1)
    masked = mask_random_tokens(input_ids, attention_mask, MASK, [CLS, SEP, PAD, MASK], 0.2)
    changed = masked != input_ids
    words = attention_mask.bool() & (input_ids >= 1000)
    assert not (changed & ~words).any()  # [CLS], [SEP] and padding untouched
    assert (masked[changed] == MASK).all()
    share = changed.sum().item() / words.sum().item()
    assert 0.17 < share < 0.23
    assert (input_ids >= 0).all() and not (input_ids == MASK).any()  # the input is not modified in place


def test_zero_probability_and_padding_without_attention_mask():
    input_ids, attention_mask = batch()
    assert torch.equal(mask_random_tokens(input_ids, attention_mask, MASK, [CLS, SEP, PAD], 0.0), input_ids)
    masked = mask_random_tokens(input_ids, None, MASK, [CLS, SEP], 0.5)
    assert ((masked == MASK) & (input_ids == PAD)).any()  # without a mask, unprotected padding is a real token


@pytest.mark.parametrize("probability", [0.1, 0.5])
def test_same_seed_same_masks(probability):
    input_ids, attention_mask = batch()
    torch.manual_seed(3)
    first = mask_random_tokens(input_ids, attention_mask, MASK, [CLS, SEP, PAD], probability)
    torch.manual_seed(3)
    assert torch.equal(first, mask_random_tokens(input_ids, attention_mask, MASK, [CLS, SEP, PAD], probability))
