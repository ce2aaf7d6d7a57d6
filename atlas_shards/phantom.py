"""Realistic phantom T1 scans with stroke lesions, built from the MNI152 template.

Everything starts from the MNI152 2009a symmetric template that nilearn ships
(197x233x189, 1 mm, RAS). The template is skull-stripped while ATLAS images are
not, so a layered head (CSF, skull tables, marrow, muscle, scalp fat) is grown
around the brain. Each subject then gets, in template space, one or more
lesions placed in grey/white matter and painted towards CSF intensity with a
partial-volume edge; the image is warped by a small affine jitter plus a smooth
random displacement field (independent in the two hemispheres, so the brain is
only quasi-symmetric), multiplied by a bias field, scaled and given Rician noise.

The volumes drawn here are only test data; they are never a stand-in for ATLAS.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# Lesion volume distribution of ATLAS v2.0 (mm^3): median and quartiles.
LESION_MEDIAN_MM3 = 5300.0
LESION_Q1_MM3 = 1200.0
LESION_Q3_MM3 = 36000.0
LESION_MIN_MM3 = 15.0
LESION_MAX_MM3 = 500000.0
# Lesion location categories and how often a subject falls in each.
CATEGORIES = ("left", "right", "bilateral", "brainstem")
CATEGORY_P = (0.42, 0.42, 0.09, 0.07)
# Held-out variants may also ask for lesions across the midline (where a lesion's mirror cube is lesion too),
# weighted as a bilateral subject when mixed with the others.
LOCATIONS = {**dict(zip(CATEGORIES, CATEGORY_P)), "midline": 0.09}
MIDLINE_HALF_WIDTH = 4  # voxels either side of x = 0 mm where a midline lesion is centred
# Brainstem box in MNI millimetres (x, y, z ranges).
BRAINSTEM_BOX_MM = ((-7.0, 7.0), (-38.0, -18.0), (-42.0, -12.0))
# Template intensity (0-1 scale) that lesions are pulled towards: darker than
# grey matter (~0.6), close to ventricular CSF.
LESION_LEVEL = 0.18


@dataclass
class Anatomy:
    """The template anatomy every phantom is made from (template grid, RAS)."""

    head: np.ndarray  # float32 T1 intensity, brain from the template plus a synthetic head
    parenchyma: np.ndarray  # bool, grey + white matter probability > 0.5
    brain: np.ndarray  # bool, the template brain mask
    affine: np.ndarray  # 4x4 voxel -> MNI mm

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.head.shape  # type: ignore[return-value]

    @property
    def midline_index(self) -> float:
        """Voxel index of the plane x = 0 mm along the first axis."""
        return float(-self.affine[0, 3] / self.affine[0, 0])


@dataclass(frozen=True)
class Variant:
    """How a phantom release departs from the default generator, for checks on data no recipe was tuned on:
    lesion volumes scaled, other locations (``midline`` among them), another lesion intensity (contrast).
    The default draws exactly what the generator always drew."""

    lesion_scale: float = 1.0  # every subject's total lesion volume times this (clipped to 15 mm^3 .. 500 mL)
    locations: tuple[str, ...] = CATEGORIES  # the location categories drawn, in LOCATIONS' proportions
    lesion_level: float = LESION_LEVEL  # template intensity (0-1) lesions are pulled to; higher: less contrast

    def __post_init__(self):
        unknown = [loc for loc in self.locations if loc not in LOCATIONS]
        if unknown or not self.locations:
            raise ValueError(f"unknown lesion location(s) {unknown}; choose from {', '.join(LOCATIONS)}")
        if not 0 < self.lesion_scale <= 100:
            raise ValueError(f"lesion scale {self.lesion_scale}: a factor in (0, 100]")
        if not 0 <= self.lesion_level < 1:
            raise ValueError(f"lesion level {self.lesion_level}: a template intensity in [0, 1)")

    def to_dict(self) -> dict:
        return {"lesion_scale": self.lesion_scale, "locations": list(self.locations), "lesion_level": self.lesion_level}


@dataclass
class Lesion:
    """One planted lesion: its side and volume in template voxels (1 mm^3)."""

    side: str  # left, right, brainstem or midline
    voxels: int
    centre_mm: list[float] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def load_anatomy() -> Anatomy:
    """Load the nilearn MNI152 template and grow a head around it (cached)."""
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=1)
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata()
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0
    parenchyma = ((gm + wm) > 0.5) & brain
    head = _grow_head(t1, brain)
    return Anatomy(head=head, parenchyma=parenchyma, brain=brain, affine=t1_img.affine.copy())


def _grow_head(t1: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Layers outside the brain by distance (mm): CSF, inner table, marrow,
    outer table, muscle, scalp fat. Intensities on the template's 0-1 scale."""
    dist = ndimage.distance_transform_edt(~brain).astype(np.float32)
    layers = [(2.5, 0.18), (4.5, 0.05), (7.0, 0.55), (8.5, 0.05), (10.5, 0.40), (15.0, 0.85)]
    head = np.zeros_like(t1)
    inner = 0.0
    for outer, level in layers:
        head[(dist > inner) & (dist <= outer)] = level
        inner = outer
    head = ndimage.gaussian_filter(head, 0.7)
    head[brain] = t1[brain]
    return head


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], n_ctrl: tuple[int, ...]) -> np.ndarray:
    """A smooth random field of unit-ish amplitude: Gaussian-RBF interpolation
    of random control values on a coarse grid, as a separable tensor product
    (much cheaper than ``ndimage.zoom`` on a full volume)."""
    values = rng.standard_normal(n_ctrl).astype(np.float32)
    mats = []
    for n, c in zip(shape, n_ctrl):
        x = np.arange(n, dtype=np.float32)
        centres = np.linspace(0, n - 1, c, dtype=np.float32)
        width = max((n - 1) / max(c - 1, 1), 1.0)
        w = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / width) ** 2)
        mats.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
    out = np.tensordot(mats[0], values, axes=(1, 0))  # (I, b, c)
    out = np.tensordot(out, mats[1], axes=(1, 1))  # (I, c, J)
    out = np.tensordot(out, mats[2], axes=(1, 1))  # (I, J, K)
    return out / max(float(out.std()), 1e-6)


def draw_lesion_volume(rng: np.random.Generator, scale: float = 1.0) -> float:
    """Total lesion volume (mm^3) from a split log-normal matching ATLAS v2.0 (times ``scale``)."""
    z = rng.standard_normal()
    mu = np.log(LESION_MEDIAN_MM3)
    sigma = (mu - np.log(LESION_Q1_MM3)) / 0.6745 if z < 0 else (np.log(LESION_Q3_MM3) - mu) / 0.6745
    return float(np.clip(scale * np.exp(mu + sigma * z), LESION_MIN_MM3, LESION_MAX_MM3))


def plan_lesions(
    rng: np.random.Generator, category: str | None = None, variant: Variant = Variant()
) -> tuple[str, list[Lesion]]:
    """Choose a location category and split a drawn total volume into lesions."""
    if category is None and variant.locations == CATEGORIES:
        category = str(rng.choice(CATEGORIES, p=CATEGORY_P))  # the default generator's draws, unchanged
    elif category is None:
        weights = np.array([LOCATIONS[loc] for loc in variant.locations])
        category = str(rng.choice(variant.locations, p=weights / weights.sum()))
    total = draw_lesion_volume(rng, variant.lesion_scale)
    if category == "brainstem":
        return category, [Lesion("brainstem", int(max(LESION_MIN_MM3, min(total, 6000.0))))]
    n = int(rng.choice([1, 2, 3, 4, 5], p=[0.55, 0.25, 0.12, 0.05, 0.03]))
    if category == "bilateral":
        n = max(n, 2)
    # The first lesion dominates, as in real multi-lesion strokes.
    shares = np.sort(rng.dirichlet(np.full(n, 0.7)))[::-1]
    sides = [category] * n if category != "bilateral" else ["left" if i % 2 == 0 else "right" for i in range(n)]
    if category == "bilateral" and rng.random() < 0.5:
        sides = ["right" if s == "left" else "left" for s in sides]
    lesions = [Lesion(s, int(max(LESION_MIN_MM3, round(total * f)))) for s, f in zip(sides, shares)]
    return category, lesions


def paint_lesions(rng: np.random.Generator, anatomy: Anatomy, lesions: list[Lesion]) -> np.ndarray:
    """Grow each lesion in template space; return labels (uint8, 0 = none, k = lesion k)."""
    labels = np.zeros(anatomy.shape, dtype=np.uint8)
    mid = anatomy.midline_index
    inv = np.linalg.inv(anatomy.affine)
    for k, lesion in enumerate(lesions, start=1):
        allowed = anatomy.parenchyma.copy()
        if lesion.side == "left":
            allowed[int(np.ceil(mid)) - 2 :] = False
        elif lesion.side == "right":
            allowed[: int(np.floor(mid)) + 3] = False
        if lesion.side == "midline":  # centred within a few voxels of x = 0 mm, free to grow into both sides
            near = np.zeros(anatomy.shape[0], dtype=bool)
            near[int(round(mid)) - MIDLINE_HALF_WIDTH : int(round(mid)) + MIDLINE_HALF_WIDTH + 1] = True
            candidates = np.flatnonzero(allowed & near[:, None, None])
            centre = np.array(np.unravel_index(rng.choice(candidates), anatomy.shape))
        elif lesion.side == "brainstem":
            box = np.array(BRAINSTEM_BOX_MM)
            corner = rng.uniform(box[:, 0], box[:, 1])
            centre = np.round(inv[:3, :3] @ corner + inv[:3, 3]).astype(int)
            centre = np.clip(centre, 0, np.array(anatomy.shape) - 1)
        else:
            candidates = np.flatnonzero(allowed)
            centre = np.array(np.unravel_index(rng.choice(candidates), anatomy.shape))
        if lesion.side == "brainstem":
            allowed = anatomy.brain
        region = _grow_region(rng, allowed, centre, lesion.voxels)
        labels[region] = k
        lesion.centre_mm = [round(float(v), 1) for v in anatomy.affine[:3, :3] @ centre + anatomy.affine[:3, 3]]
    return labels


def _grow_region(rng: np.random.Generator, allowed: np.ndarray, centre: np.ndarray, voxels: int) -> np.ndarray:
    """The ``voxels`` allowed voxels with the lowest score around ``centre``,
    the score being an anisotropic distance perturbed by smooth noise, so the
    shape is an irregular blob of exactly the requested size (when it fits)."""
    half = int(np.clip(1.8 * voxels ** (1 / 3), 4, 120))
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, allowed.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub_allowed = allowed[box]
    grid = np.indices(sub_allowed.shape, dtype=np.float32)
    axes = rng.uniform(0.6, 1.5, size=3).astype(np.float32)
    dist = np.sqrt(sum(((grid[i] - (centre[i] - lo[i])) / axes[i]) ** 2 for i in range(3)))
    noise = ndimage.gaussian_filter(rng.standard_normal(sub_allowed.shape).astype(np.float32), max(1.0, half / 5))
    noise /= max(float(noise.std()), 1e-6)
    score = dist + 0.35 * half * noise
    score[~sub_allowed] = np.inf
    n = int(min(voxels, sub_allowed.sum()))
    out = np.zeros(allowed.shape, dtype=bool)
    if n == 0:
        return out
    flat = np.argpartition(score.ravel(), n - 1)[:n]
    sub = np.zeros(sub_allowed.shape, dtype=bool)
    sub.ravel()[flat] = True
    out[box] = sub
    return out


def render_subject(
    anatomy: Anatomy, labels: np.ndarray, rng: np.random.Generator, lesion_level: float = LESION_LEVEL
) -> tuple[np.ndarray, np.ndarray]:
    """Paint the lesions dark, deform, add bias and noise.

    Returns:
        image: float32 (197, 233, 189) on the template grid, arbitrary scanner units.
        labels: uint8 lesion labels warped with the same deformation (nearest).
    """
    shape = anatomy.shape
    image = anatomy.head.copy()
    if labels.any():
        frac = ndimage.gaussian_filter((labels > 0).astype(np.float32), 0.8)  # partial-volume edge
        level = lesion_level * rng.uniform(0.8, 1.3)
        image = image * (1 - frac) + level * frac
    coords = _deformation(rng, anatomy)
    image = ndimage.map_coordinates(image, coords, order=1, mode="constant", cval=0.0, output=np.float32)
    warped = ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0, output=np.uint8)
    del coords
    bias = np.exp(0.12 * smooth_field(rng, shape, (4, 5, 4)))
    scale = np.float32(rng.uniform(300.0, 1200.0))
    image *= bias * scale
    sigma = np.float32(0.02 * scale)
    n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
    image = np.sqrt((image + n1) ** 2 + n2**2)  # Rician magnitude noise
    return image.astype(np.float32), warped


def rotation(angles: np.ndarray) -> np.ndarray:
    """3x3 rotation about x, then y, then z (radians)."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    return (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )


def _deformation(rng: np.random.Generator, anatomy: Anatomy) -> np.ndarray:
    """Sampling coordinates (3, I, J, K): affine jitter about the brain centre
    plus a smooth displacement drawn independently for each hemisphere."""
    shape = anatomy.shape
    rot = rotation(np.deg2rad(rng.uniform(-3, 3, size=3)))
    mat = (rot * rng.uniform(0.96, 1.04, size=3)).astype(np.float32)
    centre = np.array(shape, dtype=np.float32) / 2
    shift = rng.uniform(-2.5, 2.5, size=3).astype(np.float32)
    grid = np.indices(shape, dtype=np.float32)
    coords = np.tensordot(mat, grid - centre[:, None, None, None], axes=(1, 0))
    coords += (centre + shift)[:, None, None, None]
    del grid
    # Independent displacement fields for the left and right halves, blended
    # smoothly across the midline.
    mid = anatomy.midline_index
    x = np.arange(shape[0], dtype=np.float32)
    w_right = (1 / (1 + np.exp(-(x - mid) / 4.0)))[:, None, None]
    for axis in range(3):
        left = smooth_field(rng, shape, (6, 7, 6))
        right = smooth_field(rng, shape, (6, 7, 6))
        coords[axis] += 2.0 * (left * (1 - w_right) + right * w_right)
    return coords


# Native acquisition protocols: (shape, voxel size mm, axis codes). Extents
# cover a head; shapes span the 96-256 range seen in ATLAS native scans.
NATIVE_PROTOCOLS = (
    ((176, 240, 256), (1.0, 1.0, 1.0), "RPI"),
    ((256, 256, 150), (0.9375, 0.9375, 1.2), "LPS"),
    ((192, 256, 256), (1.0, 0.9375, 0.9375), "PIR"),
    ((128, 128, 96), (1.8, 1.8, 2.0), "ASL"),
    ((160, 216, 176), (1.1, 1.0, 1.0), "LAS"),
)
_AXIS_DIRECTIONS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
# Brain centre in MNI mm, used to centre native fields of view.
_BRAIN_CENTRE_MM = np.array([0.0, -18.0, 12.0])


def to_native(
    anatomy: Anatomy, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, protocol: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Resample a template-grid phantom onto a native scanner grid.

    The head is placed in scanner space by a small rigid motion plus an
    arbitrary scanner origin, and sampled on the protocol's grid and axis
    order. Returns the int16 image, uint8 labels (nearest), the native affine
    and facts for the truth file (axis codes, where the midline lands).
    """
    shape, voxel, codes = NATIVE_PROTOCOLS[protocol]
    rot = rotation(np.deg2rad(rng.uniform([-6, -2, -3], [6, 2, 3])))  # pitch, roll, yaw
    offset = rng.uniform([-20, 0, -40], [20, 40, 10])  # scanner origin is not the AC
    dirs = np.array([_AXIS_DIRECTIONS[c] for c in codes], dtype=float).T  # columns
    native = np.eye(4)
    native[:3, :3] = dirs * np.asarray(voxel)
    centre_world = rot @ _BRAIN_CENTRE_MM + offset + rng.uniform(-6, 6, size=3)
    native[:3, 3] = centre_world - native[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    # native voxel -> native world -> MNI world -> template voxel
    mni_from_native = np.eye(4)
    mni_from_native[:3, :3] = rot.T
    mni_from_native[:3, 3] = -rot.T @ offset
    vox = np.linalg.inv(anatomy.affine) @ mni_from_native @ native
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = (vox[:3, :3].astype(np.float32) @ grid + vox[:3, 3:4].astype(np.float32)).reshape(3, *shape)
    out = ndimage.map_coordinates(image, coords, order=1, mode="constant", cval=0.0, output=np.float32)
    out_labels = ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0, output=np.uint8)
    # Scanner units: int16 with a protocol-dependent gain.
    out = np.clip(np.round(out * rng.uniform(0.8, 2.5)), 0, 32767).astype(np.int16)
    midline_world = rot @ np.array([0.0, -18.0, 12.0]) + offset
    facts = {
        "axcodes": codes,
        "voxel_mm": list(voxel),
        "shape": list(shape),
        "midline_world_mm": midline_world.round(2).tolist(),
    }
    return out, out_labels, native, facts
