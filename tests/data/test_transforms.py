import torch
import torch.nn.functional as F

from fedmoe.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Cutout,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    ToFloat,
    cifar_eval_transform,
    cifar_train_transform,
    femnist_eval_transform,
    femnist_train_transform,
    resized_crop,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct_images(b: int, c: int, h: int, w: int) -> torch.Tensor:
    """Every pixel of every sample has its own positive value, so a crop or flip can be located."""
    return torch.arange(1, b * c * h * w + 1, dtype=torch.float32).reshape(b, c, h, w)


def test_to_float_scales_uint8_to_unit_range():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(1, 1, 1, 3)
    out = ToFloat()(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.2, 1.0]))


def test_normalize_per_channel_values():
    x = torch.ones(2, 3, 2, 2)
    out = Normalize(IMAGENET_MEAN, IMAGENET_STD)(x)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[:, :, 0, 0], expected.expand(2, 3))
    half = Normalize(0.5, 0.5)(torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2))
    assert torch.allclose(half.flatten(), torch.tensor([-1.0, 1.0]))


def test_random_crop_is_a_shifted_copy_of_the_zero_padded_image_with_per_sample_offsets():
    x = distinct_images(32, 2, 8, 8)
    out = RandomCrop(8, padding=2, generator=gen(1))(x)
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = set()
    for b in range(len(x)):
        shifts = [(dy, dx) for dy in range(5) for dx in range(5)]
        matches = [(dy, dx) for dy, dx in shifts if torch.equal(out[b], padded[b, :, dy : dy + 8, dx : dx + 8])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 5


def test_random_crop_same_generator_seed_same_output():
    x = distinct_images(4, 1, 6, 6)
    assert torch.equal(RandomCrop(6, 2, gen(3))(x), RandomCrop(6, 2, gen(3))(x))


def test_horizontal_flip_flips_some_samples_exactly_and_leaves_the_others():
    x = distinct_images(64, 2, 4, 5)
    out = RandomHorizontalFlip(0.5, generator=gen(2))(x)
    flipped = [torch.equal(out[b], x[b].flip(-1)) for b in range(64)]
    kept = [torch.equal(out[b], x[b]) for b in range(64)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_horizontal_flip_probability_extremes():
    x = distinct_images(8, 1, 3, 3)
    assert torch.equal(RandomHorizontalFlip(1.0)(x), x.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(x), x)


def hole_extent(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(first row, end row, first col, end col) of a rectangular True region, checking it is a rectangle."""
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    assert r1 - r0 == len(rows) and c1 - c0 == len(cols)
    assert mask[r0:r1, c0:c1].all() and mask.sum() == (r1 - r0) * (c1 - c0)
    return r0, r1, c0, c1


def test_cutout_zeroes_one_square_in_all_channels_clipped_at_the_border():
    size, h, w = 6, 10, 10
    x = torch.ones(300, 3, h, w)
    out = Cutout(size, generator=gen(4))(x)
    full = clipped = 0
    for b in range(len(x)):
        zero = out[b] == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
        assert torch.equal(out[b][~zero], x[b][~zero])
        r0, r1, c0, c1 = hole_extent(zero[0])
        for lo, hi, n in ((r0, r1, h), (c0, c1, w)):
            assert hi - lo <= size
            if 0 < lo and hi < n:
                assert hi - lo == size
        if (r1 - r0, c1 - c0) == (size, size):
            full += 1
        else:
            clipped += 1
    assert full > 0 and clipped > 0


def test_cutout_square_is_centred_on_its_pixel():
    out = Cutout(4, generator=gen(5))(torch.ones(200, 1, 9, 9))
    tops = {hole_extent(out[b, 0] == 0)[0] for b in range(200)}
    assert min(tops) == 0 and max(tops) == 9 - 1 - 2


def test_resized_crop_of_the_identity_box_returns_the_image():
    x = torch.rand(3, 2, 28, 28)
    boxes = torch.tensor([[0, 0, 28, 28]] * 3)
    assert torch.allclose(resized_crop(x, boxes, (28, 28)), x, atol=1e-5)


def test_resized_crop_maps_the_box_exactly_onto_the_output():
    x = torch.rand(2, 1, 32, 32)
    same_scale = resized_crop(x, torch.tensor([[4, 6, 16, 16], [10, 0, 16, 16]]), (16, 16))
    assert torch.allclose(same_scale[0], x[0, :, 4:20, 6:22], atol=1e-5)
    assert torch.allclose(same_scale[1], x[1, :, 10:26, 0:16], atol=1e-5)
    halved = resized_crop(x, torch.tensor([[0, 0, 32, 32]] * 2), (16, 16))
    assert torch.allclose(halved, F.avg_pool2d(x, 2), atol=1e-5)


def test_random_resized_crop_boxes_follow_the_sampling_rule():
    rrc = RandomResizedCrop(28, scale=(0.9, 1.1), ratio=(3 / 4, 4 / 3), generator=gen(6))
    boxes = rrc.boxes(500, 28, 28)
    top, left, h, w = boxes.unbind(1)
    assert (h > 0).all() and (w > 0).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    area = (h * w).float() / 28**2
    assert area.min() > 0.8 and area.max() <= 1.0
    assert len(set(map(tuple, boxes.tolist()))) > 20


def test_random_resized_crop_falls_back_to_a_centre_crop_clamped_to_the_ratio():
    rrc = RandomResizedCrop(10, scale=(5.0, 6.0), ratio=(3 / 4, 4 / 3), generator=gen(7))
    tall = rrc.boxes(4, 40, 20)
    assert tall.tolist() == [[6, 0, 27, 20]] * 4
    square = rrc.boxes(2, 12, 12)
    assert square.tolist() == [[0, 0, 12, 12]] * 2


def test_random_resized_crop_output_shape_and_per_sample_variation():
    x = torch.rand(1, 1, 28, 28).expand(16, 1, 28, 28).contiguous()
    out = RandomResizedCrop(28, generator=gen(8))(x)
    assert out.shape == (16, 1, 28, 28)
    assert not all(torch.allclose(out[0], out[b]) for b in range(1, 16))


def test_compose_applies_in_order():
    t = Compose([lambda x: x + 1, lambda x: x * 2])
    assert torch.equal(t(torch.zeros(1, 1, 1, 1)), torch.full((1, 1, 1, 1), 2.0))


def test_cifar_presets_shapes_and_eval_values():
    x = torch.full((5, 3, 32, 32), 255, dtype=torch.uint8)
    train = cifar_train_transform()(x)
    assert train.shape == (5, 3, 32, 32) and train.dtype == torch.float32
    assert (train == 0).any()
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(cifar_eval_transform()(x)[:, :, 7, 7], expected.expand(5, 3))


def test_femnist_presets_shapes_and_eval_values():
    x = torch.rand(6, 1, 28, 28)
    assert femnist_train_transform()(x).shape == (6, 1, 28, 28)
    assert torch.allclose(femnist_eval_transform()(x), (x - 0.5) / 0.5)


def test_global_rng_makes_augmentation_reproducible():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(11)
    a = cifar_train_transform()(x)
    torch.manual_seed(11)
    b = cifar_train_transform()(x)
    assert torch.equal(a, b)


def test_random_resized_crop_fallback_clamps_a_wide_image_to_the_largest_ratio():
    rrc = RandomResizedCrop(8, scale=(0.99, 1.0), ratio=(3 / 4, 3 / 4), generator=gen(9))
    assert rrc.boxes(5, 8, 8).tolist() == [[0, 1, 8, 6]] * 5
