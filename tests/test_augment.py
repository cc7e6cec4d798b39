import numpy as np
import torch

from bmc.data import Augmentation, Normalization
from bmc.train.augment import Normalizer, random_crop_flip


def _images(batch=64, size=8):
    return torch.arange(batch * 3 * size * size, dtype=torch.int64).reshape(batch, 3, size, size).to(torch.uint8)


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    images = _images()
    out = random_crop_flip(images, Augmentation(crop_padding=2), torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for index in range(len(images)):
        windows = [padded[index, :, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[index], w) for w in windows)
    # Different images get different shifts.
    shifts = {int((out[i] == 0).sum()) for i in range(len(images))}
    assert len(shifts) > 3


def test_flip_mirrors_about_half_the_images_and_is_seeded():
    images = _images(batch=400)
    out = random_crop_flip(images, Augmentation(horizontal_flip=True), torch.Generator().manual_seed(3))
    flipped = [torch.equal(out[i], images[i].flip(2)) for i in range(len(images))]
    assert 150 < sum(flipped) < 250
    again = random_crop_flip(images, Augmentation(horizontal_flip=True), torch.Generator().manual_seed(3))
    assert torch.equal(out, again)


def test_disabled_augmentation_returns_the_batch_untouched():
    images = _images()
    assert random_crop_flip(images, Augmentation(), torch.Generator()) is images


def test_normalizer_matches_the_formula_and_resizes():
    normalization = Normalization(1 / 255, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    stored = _images(batch=2)
    expected = (stored.float().numpy() / 255 - np.array(normalization.mean)[None, :, None, None]) / np.array(
        normalization.std
    )[None, :, None, None]
    np.testing.assert_allclose(Normalizer(normalization, image=True)(stored).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert Normalizer(normalization, image=True, resize_to=(32, 32))(stored).shape == (2, 3, 32, 32)


def test_epoch_batches_split_one_global_batch_between_processes():
    from bmc.train.augment import epoch_batches

    images = _images(batch=40)
    labels = torch.arange(40)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    normalizer = Normalizer(Normalization(1 / 255, (0.5,) * 3, (0.25,) * 3), image=True)
    augmentation = Augmentation(crop_padding=2, horizontal_flip=True)

    def batches(share):
        generator = torch.Generator().manual_seed(7)
        return list(epoch_batches(images, labels, order, 8, share, augmentation, normalizer, generator, torch.channels_last))

    single = batches(slice(0, 8))
    halves = [batches(slice(0, 4)), batches(slice(4, 8))]
    assert len(single) == 5  # 40 images, batch 8
    for whole, first, second in zip(single, *halves):
        assert torch.equal(whole[0], torch.cat([first[0], second[0]]))
        assert torch.equal(whole[1], torch.cat([first[1], second[1]]))
        assert whole[0].is_contiguous(memory_format=torch.channels_last)
    assert sorted(torch.cat([b[1] for b in single]).tolist()) == list(range(40))
