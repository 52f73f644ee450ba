"""Procedural, deterministic "shapes" multi-task data set.

Scene model: every image is a camera looking at a textured background plane
(depth ~8..10, tilted in a random direction) in front of which float 2 or more
flat geometric objects (circle, square, triangle, cross), each at its own depth
in [2, 7] with a slight tilt of its own. Objects are composited far-to-near
(painter's algorithm) with a per-pixel depth test, so the label maps always
describe the visible surface:

* ``image``   - RGB colour of the visible surface, darker where the surface is
  farther (depth-cued shading, which makes each plane's orientation visible), plus
  mild pixel noise;
* ``seg``     - class index + 1 of the visible object, 0 for background;
* ``depth``   - distance of the visible surface;
* ``normal``  - unit surface normal of the visible surface (see below);
* ``cls``     - the class covering the largest visible area (summed over all
  objects of that class, i.e. exactly what ``seg`` shows);
* ``present`` - multi-hot [N, 4]: the classes with at least one visible pixel;
* ``count``   - how many objects have at least one visible pixel;
* ``near``    - the class of the nearest visible object: the class at the
  object pixel of smallest depth.

Geometry and the normal convention. The camera is orthographic and every
surface is a plane, so depth is linear in the pixel position over each visible
surface. Image axes: x to the right (along W), y down (along H), z = depth,
away from the camera. Lateral positions are measured in half image widths,
X = 2 * (px + 0.5) / size - 1 and likewise Y, so the image spans [-1, 1] at
every resolution; depth keeps its own units. The normal of a surface with depth
d(X, Y) is the one facing the camera,

    n = (dd/dX, dd/dY, -1) / sqrt((dd/dX)^2 + (dd/dY)^2 + 1),

computed exactly from the plane's parameters (not by finite differences): the
background's slopes are its per-image gradient (so its normal tilts up to
~35 deg from the camera axis) and an object with depth d0 + t_x * dx + t_y * dy
(dx, dy in pixels / radius r) has slopes t * size / (2 r) (up to ~50 deg). Every
pixel is valid (no zero normals). Mirroring the image left-right negates the x
component (``TaskKind.flip_target`` of the ``normals`` kind does it).

All randomness comes from one ``np.random.default_rng(seed)``, so a given
argument tuple always produces bit-identical tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["SHAPE_NAMES", "generate_shapes"]

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Object size is an *equal-area radius*: every shape with radius r covers
# pi * r^2 pixels. Without this, triangles (smaller than their circumcircle)
# would rarely be the dominant class and the `cls` labels would be skewed.
_MIN_RADIUS_FRAC, _MAX_RADIUS_FRAC = 0.12, 0.35
_SQUARE_HALF_SIDE = math.sqrt(math.pi) / 2
_TRIANGLE_INRADIUS = math.sqrt(math.pi / (3 * math.sqrt(3)))
_CROSS_HALF_LENGTH = math.sqrt(9 * math.pi / 20)  # arms are 1/3 as wide as long
_CROSS_HALF_WIDTH = _CROSS_HALF_LENGTH / 3

# Objects stay strictly in front of the background even with their tilt: a
# shape reaches at most 1.56 radii from its centre (triangle corner), so the
# tilt adds at most 0.2 * sqrt(2) * 1.56 ~= 0.44, i.e. depth in (1.5, 7.5).
_OBJECT_DEPTH = (2.0, 7.0)
_MAX_TILT = 0.2
_BACKGROUND_DEPTH_MID = 9.0
_MAX_BACKGROUND_SLOPE = 0.7  # < 1/sqrt(2) keeps the plane inside (8, 10)

# Depth-cued shading, so that surface orientation is visible in the image (without it the
# normals target could not be inferred from the pixels): the farther part of every plane is
# darker. An object's brightness is 1 - _OBJECT_SHADING * (its depth - its centre depth),
# i.e. a gradient along its tilt (up to +-0.9 at the far corners, clipped); the background is
# scaled by 1 - _BACKGROUND_SHADING * (depth - 9), within +-0.35 across the image.
_OBJECT_SHADING = 2.0
_BACKGROUND_SHADING = 0.5

_PIXEL_NOISE_STD = 0.02
# Chunking bounds the float32 temporaries (~1 MiB each) independently of
# num_images, which also keeps them cache friendly.
_PIXELS_PER_CHUNK = 1 << 18


def generate_shapes(
    num_images: int,
    image_size: int = 32,
    seed: int = 0,
    min_objects: int = 2,
    max_objects: int = 4,
) -> dict[str, torch.Tensor]:
    """Returns {"image": uint8 [N,3,H,W], "cls": int64 [N], "seg": int64 [N,H,W],
    "depth": float32 [N,H,W], "normal": float16 [N,3,H,W], "present": uint8 [N,4],
    "count": float32 [N], "near": int64 [N]} (see the module docstring)."""
    _validate(num_images, image_size, min_objects, max_objects)
    n, size = int(num_images), int(image_size)
    rng = np.random.default_rng(seed)

    out = {
        "image": np.empty((n, 3, size, size), dtype=np.uint8),
        "seg": np.empty((n, size, size), dtype=np.int64),
        "depth": np.empty((n, size, size), dtype=np.float32),
        "normal": np.empty((n, 3, size, size), dtype=np.float16),
        "present": np.empty((n, len(SHAPE_NAMES)), dtype=np.uint8),
        "count": np.empty(n, dtype=np.float32),
        "near": np.empty(n, dtype=np.int64),
    }
    chunk = max(1, _PIXELS_PER_CHUNK // (size * size))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        parts = _render_chunk(rng, stop - start, size, int(min_objects), int(max_objects))
        for key, value in parts.items():
            out[key][start:stop] = value

    out["cls"] = _dominant_class(out["seg"], out["depth"])
    order = ("image", "cls", "seg", "depth", "normal", "present", "count", "near")
    return {key: torch.from_numpy(out[key]) for key in order}


def _validate(num_images: int, image_size: int, min_objects: int, max_objects: int) -> None:
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if min_objects < 1:
        raise ValueError(f"min_objects must be >= 1, got {min_objects}")
    if max_objects < min_objects:
        raise ValueError(
            f"max_objects must be >= min_objects, got max_objects={max_objects} < min_objects={min_objects}"
        )


def _render_chunk(
    rng: np.random.Generator, batch: int, size: int, min_objects: int, max_objects: int
) -> dict[str, np.ndarray]:
    rgb, depth, slope_x, slope_y = _background(rng, batch, size)
    objects = _sample_objects(rng, batch, size, min_objects, max_objects)
    seg = np.zeros((batch, size, size), dtype=np.int64)
    slot = np.full((batch, size, size), -1, dtype=np.int16)  # visible object's slot, -1 = background
    _render_image(objects, rgb, seg, depth, slope_x, slope_y, slot)
    rgb += _PIXEL_NOISE_STD * rng.standard_normal(rgb.shape, dtype=np.float32)
    image = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return {"image": image, "seg": seg, "depth": depth, "normal": _normals(slope_x, slope_y),
            **_scene_labels(seg, depth, slot, objects["cls"].shape[1])}


def _normals(slope_x: np.ndarray, slope_y: np.ndarray) -> np.ndarray:
    """Depth slopes [B,H,W] (per half image width) -> float16 unit normals [B,3,H,W] facing
    the camera: (dd/dX, dd/dY, -1) normalised."""
    inv = 1.0 / np.sqrt(slope_x * slope_x + slope_y * slope_y + 1.0)
    return np.stack([slope_x * inv, slope_y * inv, -inv], axis=1).astype(np.float16)


def _scene_labels(seg: np.ndarray, depth: np.ndarray, slot: np.ndarray, slots: int) -> dict[str, np.ndarray]:
    """present (classes visible), count (objects visible) and near (class of the object pixel
    of smallest depth; the first such pixel in row-major order on an exact tie)."""
    batch = seg.shape[0]
    flat_seg, flat_slot = seg.reshape(batch, -1), slot.reshape(batch, -1)
    present = np.stack([(flat_seg == c + 1).any(axis=1) for c in range(len(SHAPE_NAMES))], axis=1)
    visible = np.stack([(flat_slot == k).any(axis=1) for k in range(slots)], axis=1)
    nearest_pixel = np.where(flat_seg > 0, depth.reshape(batch, -1), np.inf).argmin(axis=1)
    # Every image shows an object (see _sample_objects), so that pixel is an object pixel.
    near = flat_seg[np.arange(batch), nearest_pixel] - 1
    return {"present": present.astype(np.uint8), "count": visible.sum(axis=1).astype(np.float32),
            "near": near.astype(np.int64)}


def _column(a: np.ndarray) -> np.ndarray:
    """Per-image scalars [B] as float32 [B, 1, 1], to broadcast over pixels."""
    return a.astype(np.float32)[:, None, None]


def _normalised_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1], so textures look alike at any resolution."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    return t[None, None, :], t[None, :, None]  # x varies along W, y along H


def _background(
    rng: np.random.Generator, batch: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two-colour blend driven by two low-frequency sinusoids, on a tilted far plane.
    Returns rgb [B,3,H,W], depth [B,H,W] and the plane's depth slopes along X and Y (per
    half image width, see the module docstring) as [B,H,W] maps."""
    x, y = _normalised_grid(size)

    # A second colour at a guaranteed distance from the first keeps the
    # texture visible, so the background can never be a flat colour.
    colour_a = rng.uniform(0.1, 0.9, (batch, 3))
    direction = rng.standard_normal((batch, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-12
    colour_b = np.clip(colour_a + direction * rng.uniform(0.3, 0.5, (batch, 1)), 0.0, 1.0)

    pattern = np.full((batch, size, size), 0.5, dtype=np.float32)
    for _ in range(2):
        freq = _column(rng.uniform(0.5, 2.0, batch)) * (2 * np.pi)  # cycles per image
        angle = rng.uniform(0, 2 * np.pi, batch)
        phase = _column(rng.uniform(0, 2 * np.pi, batch))
        pattern += 0.25 * np.sin(freq * (_column(np.cos(angle)) * x + _column(np.sin(angle)) * y) + phase)

    a = colour_a.astype(np.float32)[:, :, None, None]
    b = colour_b.astype(np.float32)[:, :, None, None]
    rgb = a + (b - a) * pattern[:, None]

    slope = rng.uniform(0, _MAX_BACKGROUND_SLOPE, batch)
    tilt = rng.uniform(0, 2 * np.pi, batch)
    gx, gy = _column(slope * np.cos(tilt)), _column(slope * np.sin(tilt))
    # 2x - 1 and 2y - 1 are X and Y: the plane's slopes are exactly gx and gy.
    depth = _BACKGROUND_DEPTH_MID + gx * (2 * x - 1) + gy * (2 * y - 1)
    rgb = rgb * (1.0 - _BACKGROUND_SHADING * (depth - _BACKGROUND_DEPTH_MID))[:, None]
    shape = (batch, size, size)
    slope_x = np.broadcast_to(gx, shape).astype(np.float32)
    slope_y = np.broadcast_to(gy, shape).astype(np.float32)
    return rgb, depth.astype(np.float32), slope_x, slope_y


def _sample_objects(
    rng: np.random.Generator, batch: int, size: int, min_objects: int, max_objects: int
) -> dict[str, np.ndarray]:
    """Per-object parameters [batch, max_objects], slots ordered far-to-near."""
    k = max_objects
    count = rng.integers(min_objects, max_objects + 1, batch)
    params = {
        "active": np.arange(k)[None, :] < count[:, None],
        "cls": rng.integers(0, len(SHAPE_NAMES), (batch, k)),
        # Integer centres put a pixel centre exactly on the object centre, which
        # every shape contains, and objects always beat the background's depth:
        # so at least that pixel of each image shows an object.
        "cx": rng.integers(0, size, (batch, k)).astype(np.float32),
        "cy": rng.integers(0, size, (batch, k)).astype(np.float32),
        "radius": rng.uniform(_MIN_RADIUS_FRAC, _MAX_RADIUS_FRAC, (batch, k)) * size,
        "angle": rng.uniform(0, 2 * np.pi, (batch, k)),
        "depth": rng.uniform(*_OBJECT_DEPTH, (batch, k)),
        "tilt": rng.uniform(-_MAX_TILT, _MAX_TILT, (batch, k, 2)),
        "colour": _hsv_to_rgb(
            rng.uniform(0, 1, (batch, k)),
            rng.uniform(0.55, 1.0, (batch, k)),
            rng.uniform(0.55, 1.0, (batch, k)),
        ),
        # Directional light across the object: mild shading, not a flat fill.
    }
    # Inactive slots sort first (treated as infinitely far) and are skipped.
    order = np.argsort(np.where(params["active"], -params["depth"], -np.inf), axis=1, kind="stable")
    rows = np.arange(batch)[:, None]
    return {name: value[rows, order] for name, value in params.items()}


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; sampling in HSV gives vivid, clearly coloured objects."""
    i = np.floor(h * 6).astype(np.int64) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], axis=0
    )
    return np.take_along_axis(table, i[None, ..., None], axis=0)[0]


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the object's rotated frame, in units of its equal-area radius."""
    name = SHAPE_NAMES[shape]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= _SQUARE_HALF_SIDE
    if name == "triangle":
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):  # one half-plane per edge, outward normals 120 deg apart
            a = np.pi / 2 + k * 2 * np.pi / 3
            inside &= u * np.float32(np.cos(a)) + v * np.float32(np.sin(a)) <= _TRIANGLE_INRADIUS
        return inside
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= _CROSS_HALF_WIDTH) & (av <= _CROSS_HALF_LENGTH)) | (
            (av <= _CROSS_HALF_WIDTH) & (au <= _CROSS_HALF_LENGTH)
        )
    raise ValueError(f"unknown shape index {shape}")


def _render_image(
    objects: dict[str, np.ndarray],
    rgb: np.ndarray,
    seg: np.ndarray,
    depth: np.ndarray,
    slope_x: np.ndarray,
    slope_y: np.ndarray,
    slot_map: np.ndarray,
) -> None:
    """Composite objects far-to-near into rgb/seg/depth, the depth slopes of the visible
    plane and the visible object's slot (all modified in place).

    Painter's order alone would suffice for flat objects; the extra depth test
    keeps the maps consistent where two tilted objects interpenetrate.
    """
    batch, size = seg.shape[0], seg.shape[1]
    pix = np.arange(size, dtype=np.float32)
    x, y = pix[None, None, :], pix[None, :, None]

    for slot in range(objects["cls"].shape[1]):
        active = objects["active"][:, slot]
        if not active.any():
            continue
        inv_r = _column(1.0 / objects["radius"][:, slot])
        dx = (x - _column(objects["cx"][:, slot])) * inv_r
        dy = (y - _column(objects["cy"][:, slot])) * inv_r
        cos_a, sin_a = _column(np.cos(objects["angle"][:, slot])), _column(np.sin(objects["angle"][:, slot]))
        u, v = dx * cos_a + dy * sin_a, dy * cos_a - dx * sin_a

        shapes = objects["cls"][:, slot]
        mask = np.zeros((batch, size, size), dtype=bool)
        for shape in range(len(SHAPE_NAMES)):
            rows = np.flatnonzero(active & (shapes == shape))
            if rows.size:
                mask[rows] = _shape_mask(shape, u[rows], v[rows])

        tilt = objects["tilt"][:, slot]
        relief = _column(tilt[:, 0]) * dx + _column(tilt[:, 1]) * dy   # depth - centre depth
        obj_depth = _column(objects["depth"][:, slot]) + relief
        draw = mask & (obj_depth < depth)
        brightness = 1.0 - _OBJECT_SHADING * relief
        colour = objects["colour"][:, slot].astype(np.float32)[:, :, None, None] * brightness[:, None]

        # dx = (px - cx) / r and px = (X + 1) * size / 2 - 0.5, so dd/dX = t * size / (2 r).
        to_x = inv_r * np.float32(size / 2)
        np.copyto(depth, obj_depth, where=draw)
        np.copyto(seg, (shapes + 1)[:, None, None], where=draw)
        np.copyto(rgb, colour, where=draw[:, None])
        np.copyto(slope_x, _column(tilt[:, 0]) * to_x, where=draw)
        np.copyto(slope_y, _column(tilt[:, 1]) * to_x, where=draw)
        np.copyto(slot_map, np.int16(slot), where=draw)


def _dominant_class(seg: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Class with the largest visible area; ties go to the class seen nearest."""
    n = seg.shape[0]
    flat_seg, flat_depth = seg.reshape(n, -1), depth.reshape(n, -1)
    area = np.stack([(flat_seg == c + 1).sum(axis=1) for c in range(len(SHAPE_NAMES))], axis=1)
    nearest = np.stack(
        [np.where(flat_seg == c + 1, flat_depth, np.inf).min(axis=1) for c in range(len(SHAPE_NAMES))], axis=1
    )
    is_max = (area == area.max(axis=1, keepdims=True)) & (area > 0)
    return np.argmax(np.where(is_max, -nearest, -np.inf), axis=1).astype(np.int64)
