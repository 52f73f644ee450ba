import numpy as np
import pytest
import torch

from kdmtl_cli.data.shapes_generator import SHAPE_NAMES, generate_shapes

NUM_CLASSES = len(SHAPE_NAMES)
BACKGROUND_DEPTH_MIN, BACKGROUND_DEPTH_MAX = 8.0, 10.0


@pytest.fixture(scope="module")
def data():
    return generate_shapes(2000, image_size=32, seed=0)


def _class_areas(seg: torch.Tensor) -> np.ndarray:
    """Visible pixel count per class, [N, NUM_CLASSES]."""
    flat = seg.flatten(1).numpy()
    return np.stack([(flat == c + 1).sum(axis=1) for c in range(NUM_CLASSES)], axis=1)


def _check_invariants(d: dict, n: int, size: int) -> None:
    assert set(d) == {"image", "cls", "seg", "depth", "normal", "present", "count", "near"}
    assert d["image"].shape == (n, 3, size, size) and d["image"].dtype == torch.uint8
    assert d["cls"].shape == (n,) and d["cls"].dtype == torch.int64
    assert d["seg"].shape == (n, size, size) and d["seg"].dtype == torch.int64
    assert d["depth"].shape == (n, size, size) and d["depth"].dtype == torch.float32
    assert d["normal"].shape == (n, 3, size, size) and d["normal"].dtype == torch.float16
    assert d["present"].shape == (n, NUM_CLASSES) and d["present"].dtype == torch.uint8
    assert d["count"].shape == (n,) and d["count"].dtype == torch.float32
    assert d["near"].shape == (n,) and d["near"].dtype == torch.int64

    seg, depth = d["seg"], d["depth"]
    assert seg.min() >= 0 and seg.max() <= NUM_CLASSES
    assert torch.isfinite(depth).all() and (depth > 0).all()
    obj, bg = seg > 0, seg == 0
    assert depth[obj].max() < BACKGROUND_DEPTH_MIN
    assert depth[bg].min() >= BACKGROUND_DEPTH_MIN and depth[bg].max() <= BACKGROUND_DEPTH_MAX
    # At least one object is visible in every image.
    assert obj.flatten(1).any(dim=1).all()
    assert d["cls"].min() >= 0 and d["cls"].max() < NUM_CLASSES
    assert d["near"].min() >= 0 and d["near"].max() < NUM_CLASSES
    # Unit normals facing the camera (negative z) at every pixel: none is invalid.
    normal = d["normal"].float()
    assert torch.allclose(normal.norm(dim=1), torch.ones(n, size, size), atol=2e-3)
    assert (normal[:, 2] < 0).all()


def test_shapes_dtypes_and_label_invariants(data):
    _check_invariants(data, 2000, 32)


@pytest.mark.parametrize("size", [48, 64])
def test_other_image_sizes(size):
    d = generate_shapes(64, image_size=size, seed=5)
    _check_invariants(d, 64, size)


def test_cls_is_class_with_largest_visible_area(data):
    areas = _class_areas(data["seg"])
    cls = data["cls"].numpy()
    rows = np.arange(len(cls))
    # A different class than argmax is only acceptable on an exact tie.
    assert (areas[rows, cls] == areas.max(axis=1)).all()
    assert (areas[rows, cls] > 0).all()


def _expected_normals(depth: torch.Tensor) -> torch.Tensor:
    """Normals from central finite differences of the depth map, by the documented convention:
    X, Y in half image widths (one pixel = 2 / size), n = (dd/dX, dd/dY, -1) normalised.
    Border pixels are left at zero."""
    _n, size, _ = depth.shape
    d = depth.double()
    slope_x, slope_y = torch.zeros_like(d), torch.zeros_like(d)
    slope_x[:, :, 1:-1] = (d[:, :, 2:] - d[:, :, :-2]) / 2 * (size / 2)   # per pixel -> per half width
    slope_y[:, 1:-1, :] = (d[:, 2:, :] - d[:, :-2, :]) / 2 * (size / 2)
    norm = (slope_x ** 2 + slope_y ** 2 + 1).sqrt()
    return torch.stack([slope_x / norm, slope_y / norm, -1 / norm], dim=1)


def _planar_interior(seg: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """Pixels whose 4 neighbours show the same class and the same normal: one plane, so the
    central differences of depth there are exact up to rounding."""
    n, size, _ = seg.shape
    inside = torch.zeros(n, size, size, dtype=torch.bool)
    centre_seg, centre_normal = seg[:, 1:-1, 1:-1], normal[:, :, 1:-1, 1:-1]
    same = torch.ones_like(centre_seg, dtype=torch.bool)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        ys, xs = slice(1 + dy, size - 1 + dy), slice(1 + dx, size - 1 + dx)
        same &= seg[:, ys, xs] == centre_seg
        same &= (normal[:, :, ys, xs] == centre_normal).all(dim=1)
    inside[:, 1:-1, 1:-1] = same
    return inside


def test_normals_match_the_depth_gradient_inside_planes(data):
    depth, seg, normal = data["depth"][:300], data["seg"][:300], data["normal"][:300]
    inside = _planar_interior(seg, normal)
    expected = _expected_normals(depth)
    got = normal.double()
    # Both background and object planes are checked, many pixels of each.
    assert (inside & (seg == 0)).sum() > 10_000 and (inside & (seg > 0)).sum() > 10_000
    error = (got - expected).abs().amax(dim=1)[inside]
    assert error.max() < 3e-3  # float16 storage (~5e-4) plus float32 depth rounding
    # The normals are not all alike: tilts reach tens of degrees from the camera axis.
    angle = torch.rad2deg(torch.acos(-got[:, 2][inside]))
    assert angle.max() > 30 and angle.mean() > 8


def test_normals_by_hand_for_one_background_pixel(data):
    """One background pixel, written out: slopes from neighbouring depths, then the normal."""
    seg, depth, normal = data["seg"], data["depth"], data["normal"]
    inside = _planar_interior(seg, normal) & (seg == 0)
    i, y, x = [int(v) for v in inside.nonzero()[0]]
    size = depth.shape[-1]
    sx = (float(depth[i, y, x + 1]) - float(depth[i, y, x - 1])) / 2 * size / 2
    sy = (float(depth[i, y + 1, x]) - float(depth[i, y - 1, x])) / 2 * size / 2
    length = (sx * sx + sy * sy + 1) ** 0.5
    assert [float(v) for v in normal[i, :, y, x]] == pytest.approx([sx / length, sy / length, -1 / length], abs=3e-3)


def test_present_agrees_with_seg(data):
    assert np.array_equal(data["present"].numpy(), (_class_areas(data["seg"]) > 0).astype(np.uint8))


def test_count_is_bounded_by_objects_and_visible_classes(data):
    count = data["count"].numpy()
    visible_classes = (_class_areas(data["seg"]) > 0).sum(axis=1)
    assert (count == np.round(count)).all()
    assert (count >= 1).all() and (count <= 4).all()     # max_objects=4; an object is always visible
    assert (count >= visible_classes).all()              # each visible class is at least one object
    assert (count > visible_classes).any()               # two objects of one class are counted twice
    assert set(np.unique(count).tolist()) == {1.0, 2.0, 3.0, 4.0}


def test_count_of_single_object_scenes_is_one():
    d = generate_shapes(100, image_size=16, seed=4, min_objects=1, max_objects=1)
    assert torch.equal(d["count"], torch.ones(100))
    assert torch.equal(d["near"], d["cls"])


def test_near_is_class_at_nearest_object_pixel(data):
    seg, depth = data["seg"].flatten(1), data["depth"].flatten(1)
    masked = torch.where(seg > 0, depth, torch.full_like(depth, float("inf")))
    pixel = masked.argmin(dim=1)
    expected = seg[torch.arange(len(seg)), pixel] - 1
    assert torch.equal(data["near"], expected)
    # near differs from cls (largest area) often enough to be a task of its own
    assert (data["near"] != data["cls"]).float().mean() > 0.2


def test_cls_ties_go_to_nearest_class():
    d = generate_shapes(3000, image_size=8, seed=11)  # tiny images make ties common
    areas = _class_areas(d["seg"])
    seg, depth = d["seg"].flatten(1), d["depth"].flatten(1)
    ties = 0
    for i in np.flatnonzero((areas == areas.max(axis=1, keepdims=True)).sum(axis=1) > 1):
        tied = np.flatnonzero(areas[i] == areas[i].max())
        nearest = [depth[i][seg[i] == c + 1].min().item() for c in tied]
        assert d["cls"][i].item() == tied[int(np.argmin(nearest))]
        ties += 1
    assert ties > 0


def test_single_object_cls_matches_seg():
    d = generate_shapes(200, image_size=32, seed=3, min_objects=1, max_objects=1)
    present = d["seg"].flatten(1).amax(dim=1) - 1
    assert torch.equal(d["cls"], present)
    # Exactly one class is visible per image.
    assert ((_class_areas(d["seg"]) > 0).sum(axis=1) == 1).all()


def test_deterministic_for_same_seed():
    a = generate_shapes(50, image_size=32, seed=123)
    b = generate_shapes(50, image_size=32, seed=123)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_different_seeds_differ():
    a = generate_shapes(50, image_size=32, seed=1)
    b = generate_shapes(50, image_size=32, seed=2)
    assert not torch.equal(a["image"], b["image"])
    assert not torch.equal(a["seg"], b["seg"])
    assert not torch.equal(a["depth"], b["depth"])
    assert not torch.equal(a["normal"], b["normal"])


def test_does_not_touch_global_rng_state():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    generate_shapes(10, image_size=32, seed=0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_background_is_textured(data):
    image, bg = data["image"].float(), data["seg"] == 0
    stds = [image[i][:, bg[i]].std().item() for i in range(len(image)) if bg[i].sum() >= 20]
    assert len(stds) > 1900
    assert min(stds) > 8.0  # in uint8 units: clearly not a flat colour


def test_background_depth_varies_smoothly(data):
    depth, bg = data["depth"], data["seg"] == 0
    # Per image the far plane is tilted, so it is not a single constant...
    spread = torch.stack([depth[i][bg[i]].max() - depth[i][bg[i]].min() for i in range(200)])
    assert (spread > 0.05).float().mean() > 0.8
    # ...but smooth: neighbouring background pixels differ by little.
    both = bg[:, :, 1:] & bg[:, :, :-1]
    step = (depth[:, :, 1:] - depth[:, :, :-1]).abs()[both]
    assert step.max() < 0.1


def test_objects_occlude_each_other(data):
    # With 2-4 objects of up to 0.35 * size radius, several classes share many images.
    visible_classes = (_class_areas(data["seg"]) > 0).sum(axis=1)
    assert (visible_classes >= 2).mean() > 0.5


def test_class_balance(data):
    freq = np.bincount(data["cls"].numpy(), minlength=NUM_CLASSES) / len(data["cls"])
    assert ((freq >= 0.15) & (freq <= 0.35)).all(), freq


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_images": 0},
        {"num_images": 4, "image_size": 7},
        {"num_images": 4, "min_objects": 0},
        {"num_images": 4, "min_objects": 3, "max_objects": 2},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        generate_shapes(**kwargs)


def test_surface_orientation_is_visible_as_depth_cued_shading(data):
    """Farther parts of every plane are darker, so a plane's tilt (its normal) shows in the
    image: inside each object, luminance falls as depth grows (clipped pixels aside)."""
    image = data["image"].float().mean(1)                  # luminance [N,H,W]
    depth, seg = data["depth"], data["seg"]
    correlations = []
    for i in range(200):
        for c in range(1, len(SHAPE_NAMES) + 1):
            pixels = (seg[i] == c) & (image[i] > 5) & (image[i] < 250)
            d, lum = depth[i][pixels], image[i][pixels]
            if pixels.sum() >= 30 and float(d.std()) > 0.05:
                correlations.append(float(torch.corrcoef(torch.stack([d, lum]))[0, 1]))
    assert len(correlations) > 50
    assert float(np.median(correlations)) < -0.8
