"""msdd.data: image decoding, ADM crops, the embedded photos, folder datasets with bad files.

Every file here is a real image written with PIL into tmp_path; nothing is mocked.
"""

import tarfile
import warnings

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from msdd.data import (
    HELDOUT_PHOTOS, TRAIN_PHOTOS, BadImageError, EmbeddedCrops, ImageFolderDataset, SkipCounter, TarShardDataset,
    build_eval_images, build_train_dataset, center_crop_arr, collate_skip_bad, embedded_eval_set,
    list_images, load_image, load_photo, random_crop_arr, to_tensor, to_uint8,
)  # fmt: skip


def noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def position_image(h, w):
    """Red = x and green = y in source pixels (h, w <= 256), so a crop's pixels say where in the source they came
    from: its red span is its width in source pixels, and red falling left to right means it was flipped."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)


def red_span(x):
    """The source-pixel width a (3, R, R) crop of a `position_image` covers, negative when it is flipped."""
    red = (x[0] + 1) * 127.5  # back to source x
    return float(red[:, -1].mean() - red[:, 0].mean()) * x.shape[-1] / (x.shape[-1] - 1)


def write_truncated_jpeg(path):
    Image.fromarray(noise(64, 64)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------- embedded photos


@pytest.mark.parametrize("name", TRAIN_PHOTOS + HELDOUT_PHOTOS)
def test_embedded_photo_loads_as_rgb(name):
    photo = load_photo(name)
    assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
    assert min(photo.shape[:2]) >= 256
    assert not photo.flags.writeable  # the cached array is shared; nobody may edit it


def test_train_and_heldout_photos_are_disjoint():
    assert not set(TRAIN_PHOTOS) & set(HELDOUT_PHOTOS)
    assert "cat" not in TRAIN_PHOTOS + HELDOUT_PHOTOS  # skimage's cat is chelsea
    left, right, _ = skimage.data.stereo_motorcycle()
    assert np.array_equal(load_photo("stereo_motorcycle"), left)


def test_the_embedded_photos_pyramid_halves_exactly():
    """The levels the training crops are cut from: each the 2x2 mean of the one above (rounded to uint8), down to
    the first level under 4 pixels."""
    from msdd.data.embedded import _pyramid

    levels = _pyramid("coffee")  # 400 x 600
    assert [tuple(x.shape[1:]) for x in levels[:3]] == [(400, 600), (200, 300), (100, 150)]
    for a, b in zip(levels, levels[1:]):
        h, w = a.shape[1] // 2, a.shape[2] // 2
        mean = a[:, : 2 * h, : 2 * w].float().reshape(3, h, 2, w, 2).mean((2, 4))
        assert b.shape == (3, h, w) and (b.float() - mean).abs().max() <= 0.5
    assert min(levels[-1].shape[1:]) < 4 <= min(levels[-2].shape[1:])


def _embedded_crop_spans(monkeypatch, h: int, w: int) -> np.ndarray:
    """The signed red spans (`red_span`) of 300 EmbeddedCrops at 32 px of an h x w position image in place of a
    photo."""
    import msdd.data.embedded as embedded

    monkeypatch.setattr(embedded, "load_photo", lambda name: position_image(h, w))
    embedded._pyramid.cache_clear()
    try:
        ds = EmbeddedCrops(32, length=300, seed=0, photos=("positions",))
        return np.array([red_span(ds[i][0]) for i in range(len(ds))])
    finally:
        embedded._pyramid.cache_clear()


def test_embedded_crops_cover_log_uniform_sides_of_the_photo(monkeypatch):
    """EmbeddedCrops on position images (standing in for photos): each crop covers a square of side log-uniform
    between the resolution and the shorter side, in source pixels whatever pyramid level it is cut from (on a 256 px
    square, median sqrt(32 * 256) = 91 px), and half the crops are flipped."""
    spans = _embedded_crop_spans(monkeypatch, 256, 256)
    sides = np.abs(spans)
    assert 30 < sides.min() < 40 and 220 < sides.max() < 258 and 75 < np.median(sides) < 110
    assert 0.4 < (spans < 0).mean() < 0.6
    # a landscape photo: the sides range up to its shorter side (here 128 of 128 x 256), so few crops (ln(128 / 112) /
    # ln(128 / 32) = 10%) come near it; ranging up to the longer one, 40% would, cut down to the shorter side
    sides = np.abs(_embedded_crop_spans(monkeypatch, 128, 256))
    assert sides.max() < 130 and 0.04 < (sides > 112).mean() < 0.2


def test_embedded_crops_are_deterministic_and_vary():
    ds = EmbeddedCrops(32, seed=0)
    x, name, reason = ds[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.01
    assert name.startswith("embedded:") and name.removeprefix("embedded:") in TRAIN_PHOTOS and reason is None
    assert torch.equal(EmbeddedCrops(32, seed=0)[5][0], x)  # a fresh instance (as in a worker) agrees
    assert not torch.equal(ds[6][0], x)
    assert not torch.equal(EmbeddedCrops(32, seed=1)[5][0], x)
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], x)
    ds.set_epoch(0)
    assert torch.equal(ds[5][0], x)


def test_embedded_crops_batch_through_the_folder_collate():
    ds = build_train_dataset("embedded", 16, seed=0, limit=20)
    assert len(ds) == 20
    x, n_skipped, skipped = next(iter(DataLoader(ds, batch_size=8, collate_fn=collate_skip_bad)))
    assert x.shape == (8, 3, 16, 16) and n_skipped == 0 and skipped == []
    names = {ds[i][1] for i in range(20)}
    assert len(names) > 2  # crops come from several photos


def test_embedded_crops_are_flipped_half_the_time_and_range_in_scale(tmp_path):
    """The embedded crops' augmentation, measured on a photo whose pixels give their own position (a 256 px
    position image as the one photo, as data.source=embedded+FOLDER adds it): about half the crops are mirrored,
    and the crop side spreads from R to the whole shorter side, as the docstring promises. A lost flip, a fixed
    scale or a crop cut at the wrong pyramid level changes these (the deterministic-crop test above cannot see it)."""
    folder = tmp_path / "extra"
    folder.mkdir()
    Image.fromarray(position_image(256, 256)).save(folder / "position.png")
    ds = build_train_dataset(f"embedded+{folder}", 32, seed=0, limit=200)
    assert ds.photos == TRAIN_PHOTOS + (str(folder / "position.png"),)  # added to the embedded photos, not instead
    ds = EmbeddedCrops(32, seed=0, photos=(str(folder / "position.png"),))
    spans = [red_span(ds[i][0]) for i in range(60)]
    flipped = sum(s < 0 for s in spans)
    assert 15 <= flipped <= 45, flipped
    sides = sorted(abs(s) for s in spans)
    assert 28 < sides[0] < 40  # the smallest crops are about R source pixels wide ...
    assert sides[-1] > 200  # ... the largest about the whole photo (256) ...
    assert sum(s < 90 for s in sides) > 10 and sum(s > 140 for s in sides) > 10  # ... and scales in between vary


def test_embedded_eval_set():
    x, names = embedded_eval_set(32)
    assert x.shape == (42, 3, 32, 32) and len(names) == 42 == len(set(names))
    assert x.min() >= -1 and x.max() <= 1
    assert {"chelsea", "rocket", "flower", "chelsea_2x2_r0c1", "flower_3x3_r2c2"} <= set(names)
    x2, names2 = embedded_eval_set(32)
    assert torch.equal(x, x2) and names == names2
    whole, whole_names = embedded_eval_set(32, tiles=False)
    assert whole_names == list(HELDOUT_PHOTOS)
    assert torch.equal(whole, x[[names.index(n) for n in HELDOUT_PHOTOS]])
    assert build_eval_images("embedded", 32, limit=5)[0].shape == (5, 3, 32, 32)


# ---------------------------------------------------------------- tensors and crops


def test_to_tensor_and_back():
    arr = noise(5, 7)
    x = to_tensor(arr)
    assert x.shape == (3, 5, 7) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x).permute(1, 2, 0).numpy(), arr)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(arr.astype(np.float32))


@pytest.mark.parametrize("shape", [(300, 451), (451, 300), (40, 50), (64, 64)])
def test_crop_shapes(shape):
    arr = noise(*shape)
    assert center_crop_arr(arr, 64).shape == (64, 64, 3)
    assert random_crop_arr(arr, 64, np.random.default_rng(0)).shape == (64, 64, 3)


def test_center_crop_keeps_the_centre():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # the centre square is white, the sides black
    out = center_crop_arr(arr, 50)
    assert out[:, 3:-3].min() == 255


def test_a_large_image_is_shrunk_by_exact_box_halvings():
    """A 128 px image to 32 px: two 2x2 box averages, no bicubic (which mixes in the neighbouring blocks): each pixel
    within 2 of its 4x4 block's mean (PIL's uint8 rounding, twice), where a bicubic last step is 24 off."""
    arr = noise(128, 128)
    blocks = arr.astype(float).reshape(32, 4, 32, 4, 3).mean((1, 3))
    assert np.abs(center_crop_arr(arr, 32).astype(float) - blocks).max() < 2


def test_random_crop_covers_80_to_100_percent_of_the_shorter_side():
    # Red = x and green = y in source pixels, so a crop's corners say where in the source it came from.
    h, w, size = 200, 250, 64
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)
    fracs = []
    for seed in range(40):
        crop = random_crop_arr(arr, size, np.random.default_rng(seed)).astype(float)
        # Pixel centres 0 and size-1 of the crop are (size-1)/size of its side apart.
        span_y = (crop[-1, :, 1].mean() - crop[0, :, 1].mean()) * size / (size - 1)
        span_x = (crop[:, -1, 0].mean() - crop[:, 0, 0].mean()) * size / (size - 1)
        assert abs(span_x - span_y) < 3  # square in the source too
        fracs.append(span_y / h)
    assert 0.78 <= min(fracs) < 0.85 and 0.95 < max(fracs) <= 1.02


# ---------------------------------------------------------------- load_image on awkward files


def test_load_grayscale_png(tmp_path):
    Image.fromarray(np.full((6, 9), 77, np.uint8), "L").save(tmp_path / "g.png")
    Image.fromarray(np.eye(8, dtype=bool)).save(tmp_path / "b.png")  # mode "1"
    gray = load_image(tmp_path / "g.png")
    assert gray.shape == (6, 9, 3) and gray.dtype == np.uint8 and (gray == 77).all()
    assert load_image(tmp_path / "b.png")[0, 0].tolist() == [255, 255, 255]


def test_load_rgba_png_composites_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, 0] = (0, 0, 0, 0)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [200, 0, 0]
    Image.fromarray(rgba, "RGBA").convert("LA").save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png")[0, 0].tolist() == [255, 255, 255]


def test_load_palette_png(tmp_path):
    img = Image.new("P", (5, 3))
    img.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [250, 0, 0]
    img.save(tmp_path / "pt.png", transparency=0)  # colour 0 transparent
    assert load_image(tmp_path / "pt.png")[0, 0].tolist() == [255, 255, 255]


def test_load_16bit_png_scales_not_clips(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(tmp_path / "d.png")
    out = load_image(tmp_path / "d.png")
    assert out.shape == (1, 3, 3) and (out == out[..., :1]).all()  # gray in all three channels
    out = out[0, :, 0].astype(int)
    assert out[0] == 0 and abs(out[1] - 128) <= 1 and out[2] == 255
    # by the 16-bit full scale (/ 257) whatever range the pixels span, not stretched to it
    for values, want in (([0, 257 * 100, 257 * 200], [0, 100, 200]), ([1000, 257 * 128, 65535], [4, 128, 255])):
        Image.fromarray(np.array([values], np.uint16)).save(tmp_path / "e.png")
        assert load_image(tmp_path / "e.png")[0, :, 0].tolist() == want


def test_load_float_tiff(tmp_path):
    """Float data is scaled by its convention's full scale: [0, 1], else [0, 255]; anything else (negative values,
    above 255) is stretched from its own minimum to its maximum."""
    cases = [([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 100.0, 200.0], [0, 100, 200]),
             ([10.0, 100.0, 255.0], [10, 100, 255]), ([-1.0, 0.0, 3.0], [0, 64, 255]),
             ([0.0, 250.0, 1000.0], [0, 64, 255])]
    for values, want in cases:
        Image.fromarray(np.array([values], np.float32), "F").save(tmp_path / "f.tiff")
        out = load_image(tmp_path / "f.tiff")
        assert out.shape == (1, 3, 3) and out[0, :, 0].tolist() == want, values


def test_load_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # red ink-free
    r, g, b = load_image(tmp_path / "c.jpg")[8, 8].astype(int)
    assert r > 240 and g < 15 and b < 15


def test_load_applies_exif_rotation(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:5, :5] = 255  # white block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "r.jpg")
    assert out.shape == (40, 20, 3)
    assert out[1, -2].min() > 200 and out[-2, 1].max() < 50  # the block is now top-right


def test_truncated_jpeg_raises_bad_image_error(tmp_path):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    path = tmp_path / "cut.jpg"
    write_truncated_jpeg(path)
    with pytest.raises(BadImageError, match="cut.jpg") as err:
        load_image(path)
    assert err.value.path == str(path) and "truncated" in err.value.reason


def test_text_file_named_png_raises_bad_image_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(BadImageError, match="notes.png"):
        load_image(path)


# ---------------------------------------------------------------- folders of users' images


@pytest.fixture
def mixed_folder(tmp_path):
    """3 good images (one nested, one with an upper-case extension), 2 bad ones, 1 non-image file."""
    (tmp_path / "sub").mkdir()
    Image.fromarray(noise(40, 60, 1)).save(tmp_path / "a.png")
    Image.fromarray(noise(50, 50, 2)).save(tmp_path / "sub" / "b.JPG")
    Image.fromarray(noise(70, 40, 3)).save(tmp_path / "c.webp")
    write_truncated_jpeg(tmp_path / "broken.jpg")
    (tmp_path / "fake.png").write_text("not an image")
    (tmp_path / "readme.txt").write_text("ignored")
    return tmp_path


def test_list_images(mixed_folder, tmp_path_factory):
    names = [p.relative_to(mixed_folder).as_posix() for p in list_images(mixed_folder)]
    assert names == ["a.png", "broken.jpg", "c.webp", "fake.png", "sub/b.JPG"]
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ValueError, match=str(empty)):
        list_images(empty)
    with pytest.raises(FileNotFoundError):
        list_images(empty / "missing")


def test_list_images_follows_linked_folders_once_and_skips_hidden_ones(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder in (root / ".ipynb_checkpoints", root / ".git", root / "sub", outside):
        folder.mkdir(parents=True)
    for path in (root / "a.png", root / ".ipynb_checkpoints" / "a-checkpoint.png", root / ".git" / "x.png",
                 root / "sub" / "b.jfif", outside / "c.ppm"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="PNG")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # a loop
    names = [p.relative_to(root).as_posix() for p in list_images(root)]
    assert names == ["a.png", "linked/c.ppm", "sub/b.jfif"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_loader_skips_bad_files(mixed_folder, num_workers):
    ds = ImageFolderDataset(mixed_folder, 32, train=True)
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_skip_bad, num_workers=num_workers)
    counter, n_good = SkipCounter(), 0
    with pytest.warns(UserWarning, match="skipping image"):
        for x, n_skipped, skipped in loader:
            assert x.shape[1:] == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
            n_good += len(x)
            counter.update(n_skipped, skipped)
    assert n_good == 3 and counter.count == 2
    assert sorted(path.rsplit("/", 1)[-1] for path, _ in counter.examples) == ["broken.jpg", "fake.png"]
    assert "broken.jpg" in counter.summary() and "skipped 2" in counter.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file skipped again (the next epoch) is not warned about twice
        for x, n_skipped, skipped in loader:
            counter.update(n_skipped, skipped)
    assert counter.count == 4 and len(counter.examples) == 2  # each file once among the examples
    assert "skipped 4 images, 2 distinct files" in SkipCounter.combined([counter, SkipCounter()]).summary()


def test_folder_dataset_train_is_seeded_and_eval_is_fixed(mixed_folder):
    train = ImageFolderDataset(mixed_folder, 32, train=True, seed=0)
    a = train[0][0]
    assert torch.equal(ImageFolderDataset(mixed_folder, 32, train=True, seed=0)[0][0], a)
    assert any(not torch.equal(train[0][0], a) for train.epoch in range(1, 6))
    ev = ImageFolderDataset(mixed_folder, 32, train=False)
    assert torch.equal(ev[0][0], to_tensor(center_crop_arr(load_image(mixed_folder / "a.png"), 32)))


def test_folder_train_crops_are_flipped_half_the_time(tmp_path):
    """The ADM augmentation of a folder source: a horizontal flip with probability 1/2 (seeded per epoch and
    index). A position image tells a flipped crop from an unflipped one (its red falls left to right); over 40
    epochs of one file both must occur in about equal numbers, and the eval crop is never flipped."""
    Image.fromarray(position_image(120, 160)).save(tmp_path / "position.png")
    ds = ImageFolderDataset(tmp_path, 32, train=True, seed=0)
    spans = []
    for ds.epoch in range(40):
        spans.append(red_span(ds[0][0]))
    assert 10 <= sum(s < 0 for s in spans) <= 30
    assert red_span(ImageFolderDataset(tmp_path, 32, train=False)[0][0]) > 0


def test_an_image_exactly_min_size_is_kept(tmp_path):
    """Too small means a shorter side *below* min_size (resolution // 2): a 16 px tall image at resolution 32 is
    upscaled and trained on, one of 15 px is skipped."""
    Image.fromarray(noise(16, 40)).save(tmp_path / "edge.png")
    Image.fromarray(noise(15, 40)).save(tmp_path / "under.png")
    ds = ImageFolderDataset(tmp_path, 32, train=True)
    x, n_skipped, skipped = collate_skip_bad([ds[i] for i in range(len(ds))])
    assert x.shape == (1, 3, 32, 32) and n_skipped == 1 and skipped[0][0].endswith("under.png")


def test_skip_counters_of_several_processes_add_up():
    """A distributed run's summary comes from `SkipCounter.combined` over every process's counter: the skips add
    up, and the distinct files are those of all processes (one file skipped on two processes counts once)."""
    a, b = SkipCounter(), SkipCounter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.update(3, [("x.png", "truncated"), ("y.png", "too small"), ("x.png", "truncated")])
        b.update(2, [("z.png", "not an image"), ("x.png", "truncated")])
    both = SkipCounter.combined([a, b])
    assert both.count == 5 and both.files == {"x.png", "y.png", "z.png"}
    assert [p for p, _ in both.examples] == ["x.png", "y.png", "z.png"]
    assert "skipped 5 images, 3 distinct files" in both.summary()


def test_too_small_image_is_skipped(tmp_path):
    Image.fromarray(noise(10, 12)).save(tmp_path / "tiny.png")
    Image.fromarray(noise(20, 24)).save(tmp_path / "small.png")  # below 32 but above min_size 16: upscaled
    ds = ImageFolderDataset(tmp_path, 32, train=True)
    x, n_skipped, skipped = collate_skip_bad([ds[i] for i in range(len(ds))])
    assert x.shape == (1, 3, 32, 32) and n_skipped == 1
    assert skipped[0][0].endswith("tiny.png") and "too small" in skipped[0][1]


def test_build_from_folder_and_bad_source(mixed_folder):
    """A folder trains on random crops, new each epoch, and evaluates on the centre crops of its usable files."""
    train = build_train_dataset(str(mixed_folder), 32, seed=0)
    assert isinstance(train, ImageFolderDataset) and train[0][1].endswith("a.png")
    first = train[0][0]
    train.set_epoch(1)
    assert not torch.equal(first, train[0][0])
    with pytest.warns(UserWarning, match="skipping image") as warned:
        x, names = build_eval_images(str(mixed_folder), 32)
    messages = " ".join(str(w.message) for w in warned)
    assert "broken.jpg" in messages and "fake.png" in messages
    assert x.shape == (3, 3, 32, 32) and names == ["a.png", "c.webp", "sub/b.JPG"]
    assert torch.equal(x[0], to_tensor(center_crop_arr(load_image(mixed_folder / "a.png"), 32)))
    with pytest.raises(ValueError, match="data.source"):
        build_train_dataset(str(mixed_folder / "nope"), 32, seed=0)
    with pytest.raises(ValueError, match="data.source"):
        build_eval_images("imagenet", 32)


# ---------------------------------------------------------------- tar shards


def write_noise_shards(root, n_shards=4, per_shard=3):
    """`n_shards` WebDataset shards of `per_shard` distinct PNGs each (sample keys s<shard>_<i>)."""
    root.mkdir()
    for s in range(n_shards):
        with tarfile.open(root / f"train-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                path = root / f"s{s}_{i}.png"
                Image.fromarray(noise(40, 40, seed=10 * s + i)).save(path)
                tar.add(path, arcname=path.name)
    return str(root / f"train-{{000000..{n_shards - 1:06d}}}.tar")


def test_tar_shards_split_over_loader_workers_cap_and_resume(tmp_path):
    """With DataLoader workers, each worker streams its own shards (every sample once per epoch, none twice),
    `limit` caps the samples of the epoch over all workers, and a resume after k batches (`set_epoch(epoch, k,
    batch_size)`) continues with the batches an uninterrupted epoch gives next: each worker skips only the records
    of the batches it made, and after an odd k the restarted DataLoader's worker 0 continues worker 1's stream
    (the two batches after the resume came swapped before). tests/test_robust.py checks processes and a resume
    without workers."""
    source = write_noise_shards(tmp_path / "shards")

    def load(ds):
        return list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip_bad))

    ds = TarShardDataset(source, 32, seed=1)
    names = [name.rsplit(":", 1)[-1] for x, name, _ in _records(ds)]
    assert sorted(names) == sorted(f"s{s}_{i}" for s in range(4) for i in range(3))  # each sample once
    assert len(_records(TarShardDataset(source, 32, seed=1, limit=4))) == 4
    straight = load(TarShardDataset(source, 32, seed=1))
    for k in (1, 2, 3):
        resumed_ds = TarShardDataset(source, 32, seed=1)
        resumed_ds.set_epoch(0, batches_done=k, batch_size=2)
        resumed = load(resumed_ds)
        assert len(resumed) == len(straight) - k
        assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(resumed, straight[k:])), k


def _records(ds):
    """Every record of one epoch of `ds` through a DataLoader with two workers, one record per batch."""
    return list(DataLoader(ds, batch_size=None, num_workers=2))
