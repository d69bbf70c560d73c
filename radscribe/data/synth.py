"""Synthetic radiology data with known ground truth: phantom images + templated reports, as MedTrinity parquet.

Run as: radscribe synth --out data/synth --n 2000 [--size 224] [--lang zh|en] [--slices-per-patient 4 [--volumes]]

No dataset can be downloaded on the project's machines, so this is the bundled source every stage is tested on.
Each row is a CT / MRI / X-ray-like phantom of one organ with at most one lesion blob. Everything a report says
is *visible* in the pixels, so that a tiny model can learn it in minutes:
- modality: CT = black background and sharp edges; MRI = noisy background and a left-to-right bias field;
  X-ray = grey background, top-to-bottom gradient and blurred edges;
- organ: the body outline and its texture (round head with a bright skull ring, wide chest with rib bands,
  rounded square with speckle, oval with vertical bands);
- lesion: one disc at one of five positions, brighter or darker than the organ, of two fixed radii; the finding
  follows from density x size (`FINDING_OF`), the relation to neighbours from size.
With `volumes`, each patient is a scan of its own anatomy and its rows are consecutive slices through it
(`Anatomy`): adjacent slices are near-duplicates, different patients are not, as in MedTrinity.
Output: parquet shards in the `25M_demo` schema (`image` = struct of bytes + path, `id`, `caption`) plus the
ground-truth columns of docs/architecture.md (`patient`, `source`, `modality`, `organ`, `location`, `density`,
`size`, `area_pct`, `finding`). Rows are a pure function of (seed, row index), so shards, workers and resumed
runs never change the data.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from radscribe.errors import RadscribeError

# The shared ground-truth vocabulary (docs/architecture.md). Every term a report uses comes from here; the eval
# lexicon must contain each of them. Density has two Chinese words: 密度 for CT/X-ray, 信号 for MRI (`zh_mri`).
VOCAB: dict[str, dict[str, dict[str, str]]] = {
    "modality": {
        "CT": {"en": "CT", "zh": "CT"},
        "MRI": {"en": "MRI", "zh": "磁共振(MRI)"},
        "X-ray": {"en": "X-ray", "zh": "X线"},
    },
    "organ": {
        "brain": {"en": "brain", "zh": "脑"},
        "lung": {"en": "lung", "zh": "肺"},
        "liver": {"en": "liver", "zh": "肝脏"},
        "kidney": {"en": "kidney", "zh": "肾脏"},
    },
    "location": {
        "left upper": {"en": "left upper", "zh": "左上"},
        "right upper": {"en": "right upper", "zh": "右上"},
        "left lower": {"en": "left lower", "zh": "左下"},
        "right lower": {"en": "right lower", "zh": "右下"},
        "central": {"en": "central", "zh": "中央"},
    },
    "density": {
        "high": {"en": "high", "zh": "高密度", "zh_mri": "高信号"},
        "low": {"en": "low", "zh": "低密度", "zh_mri": "低信号"},
    },
    "size": {
        "small": {"en": "small", "zh": "小"},
        "large": {"en": "large", "zh": "大"},
    },
    "finding": {
        "nodule": {"en": "nodule", "zh": "结节"},
        "mass": {"en": "mass", "zh": "肿块"},
        "cyst": {"en": "cyst", "zh": "囊肿"},
        "hemorrhage": {"en": "hemorrhage", "zh": "出血"},
        "normal": {"en": "normal", "zh": "正常"},
    },
}

# The finding is a fixed function of what the image shows, so it is learnable from pixels.
FINDING_OF = {("high", "small"): "nodule", ("high", "large"): "hemorrhage",
              ("low", "small"): "cyst", ("low", "large"): "mass"}

# Lesion centres as fractions of the image (x, y); "left" is the viewer's left.
LOCATION_XY = {"left upper": (0.33, 0.33), "right upper": (0.67, 0.33), "left lower": (0.33, 0.67),
               "right lower": (0.67, 0.67), "central": (0.5, 0.5)}
LESION_RADIUS = {"small": 0.065, "large": 0.13}  # fraction of the image side
LESION_CONTRAST = {"high": 85.0, "low": -75.0}  # grey levels against the organ

# Body outline per organ: (shape, half-width, half-height) as fractions of the image side. All outlines cover the
# five lesion positions, so a lesion always lies on tissue.
ORGAN_SHAPE = {"brain": ("ellipse", 0.44, 0.46), "lung": ("ellipse", 0.48, 0.40),
               "liver": ("squircle", 0.43, 0.43), "kidney": ("ellipse", 0.36, 0.47)}

# Grey levels (0-255) per modality: background, organ tissue, noise sigma.
MODALITY_LEVELS = {"CT": (0.0, 110.0, 4.0), "MRI": (25.0, 120.0, 9.0), "X-ray": (70.0, 135.0, 3.0)}

REPORT_TEMPLATES = {
    # MedTrinity's order: modality/organ -> ROI location and area % -> density/texture -> finding -> neighbours.
    "zh": {
        "lesion": "这是一张{organ}{modality}图像。{location}区域可见一{size}病灶，约占{organ}面积的{area}%。"
                  "病灶呈{density}，边界清楚，内部均匀。考虑为{finding}。{relation}",
        "normal": "这是一张{organ}{modality}图像。{organ}形态及{signal}未见异常，未见明确病灶。"
                  "考虑为{finding}表现。周围结构清晰。",
        "relation": {"small": "邻近结构未见受压。", "large": "邻近结构受压移位。"},
        "signal": {"MRI": "信号", "CT": "密度", "X-ray": "密度"},
    },
    "en": {
        "lesion": "This is a {modality} image of the {organ}. A {size} lesion is seen in the {location} region, "
                  "occupying about {area}% of the {organ}. The lesion shows {density} density with clear margins "
                  "and a homogeneous texture. The likely finding is a {finding}. {relation}",
        "normal": "This is a {modality} image of the {organ}. The {organ} appears {finding} in shape and {signal}, "
                  "with no focal lesion. The likely finding is {finding}. The surrounding structures are clear.",
        "relation": {"small": "The adjacent structures are not compressed.",
                     "large": "The adjacent structures are compressed and displaced."},
        "signal": {"MRI": "signal", "CT": "density", "X-ray": "density"},
    },
}

SOURCE_NAME = "radscribe-synth"


@dataclass
class SynthConfig:
    """What `radscribe synth` writes."""

    out: str = "data/synth"
    """Output folder for the parquet shards (created; shards of an earlier run there are replaced or removed)."""
    n: int = 1000
    """Number of images (rows)."""
    seed: int = 0
    """Random seed; rows are a pure function of (seed, row index)."""
    lang: Literal["zh", "en"] = "zh"
    """Report language."""
    size: int = 224
    """Image side in pixels (the demo uses 96-128)."""
    shard_rows: int = 1000
    """Rows per parquet shard."""
    format: Literal["jpeg", "png"] = "jpeg"
    """Image encoding inside the parquet."""
    slices_per_patient: int = 1
    """Consecutive rows sharing one patient (same modality, organ and lesion; slices differ in noise and jitter)."""
    volumes: bool = False
    """Render each patient as a scan volume: its own anatomy (outline size, position and shape, tissue texture,
    internal structures), and its slices step through it, so the body changes a little from one slice to the
    next. Adjacent slices are then near-duplicates and different patients are not, as in MedTrinity (its
    rows are slices of scans). Off: all patients of one modality and organ share one template."""
    normal_fraction: float = 0.15
    """Fraction of patients with no lesion (finding `normal`)."""
    jpeg_quality: int = 92
    """JPEG quality for `format: jpeg`."""
    workers: int = 0
    """Processes; 0 = one per CPU core when there is more than one shard, else in-process."""


# --- ground truth -------------------------------------------------------------------------------------------
def _rng(*key) -> np.random.Generator:
    # A stable per-(seed, index) stream: independent of shard size, worker count and order of generation.
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_truth(seed: int, index: int, slices_per_patient: int = 1, normal_fraction: float = 0.15) -> dict:
    """Ground truth of row `index`: a patient's modality, organ and lesion are shared by its slices."""
    patient = index // max(1, slices_per_patient)
    rng = _rng("patient", seed, patient)
    truth = {"id": f"synth-p{patient:06d}-s{index % max(1, slices_per_patient):02d}",
             "patient": f"patient-{patient:06d}", "source": SOURCE_NAME,
             "modality": _pick(rng, VOCAB["modality"]), "organ": _pick(rng, VOCAB["organ"])}
    if rng.random() < normal_fraction:
        truth.update(location=None, density=None, size=None, area_pct=0.0, finding="normal")
        return truth
    location, density, size = _pick(rng, VOCAB["location"]), _pick(rng, VOCAB["density"]), _pick(rng, VOCAB["size"])
    truth.update(location=location, density=density, size=size, area_pct=area_pct(truth["organ"], size),
                 finding=FINDING_OF[(density, size)])
    return truth


def _pick(rng: np.random.Generator, table: dict) -> str:
    keys = list(table)
    return keys[int(rng.integers(len(keys)))]


def area_pct(organ: str, size: str) -> float:
    """Lesion area as a percentage of the organ outline (fixed per organ and size, hence learnable)."""
    shape, a, b = ORGAN_SHAPE[organ]
    organ_area = math.pi * a * b if shape == "ellipse" else 4 * a * b * 0.95
    return round(100 * math.pi * LESION_RADIUS[size] ** 2 / organ_area, 1)


def report(truth: dict, lang: str = "zh") -> str:
    """The templated report for a ground truth, in `lang`."""
    if lang not in REPORT_TEMPLATES:
        raise RadscribeError(f"--lang {lang!r} is not one of {', '.join(REPORT_TEMPLATES)}")
    tpl = REPORT_TEMPLATES[lang]
    words = {f: VOCAB[f][truth[f]][lang] for f in ("modality", "organ", "finding")}
    if truth["finding"] == "normal":
        return tpl["normal"].format(signal=tpl["signal"][truth["modality"]], **words)
    density = VOCAB["density"][truth["density"]]
    density_word = density.get(f"{lang}_mri", density[lang]) if truth["modality"] == "MRI" else density[lang]
    return tpl["lesion"].format(location=VOCAB["location"][truth["location"]][lang],
                                size=VOCAB["size"][truth["size"]][lang], density=density_word,
                                area=f"{truth['area_pct']:.1f}", relation=tpl["relation"][truth["size"]], **words)


def synth_reports(n: int, seed: int = 0, lang: str = "zh", slices_per_patient: int = 1,
                  normal_fraction: float = 0.15) -> Iterator[str]:
    """Reports only (no images), the same text `synth` writes for these arguments: for training a tokenizer."""
    for index in range(n):
        yield report(sample_truth(seed, index, slices_per_patient, normal_fraction), lang)


# --- images ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Anatomy:
    """One patient's body at one slice (`volumes`); the default is the template every patient shares otherwise."""

    scale: tuple[float, float] = (1.0, 1.0)
    """Outline half-width and half-height, as factors of `ORGAN_SHAPE`'s."""
    offset: tuple[float, float] = (0.0, 0.0)
    """Outline centre shift, as fractions of the image side."""
    outline: tuple[tuple[float, float, float], ...] = ()
    """Outline harmonics (k, amplitude, phase): the radius at angle t is scaled by 1 + sum a cos(k t + phase)."""
    phase: float = 0.0
    """Phase of the rib / band texture (radians)."""
    speckle_seed: int = 7
    """Seed of the liver speckle."""
    texture: tuple[tuple[float, float, float, float], ...] = ()
    """Smooth tissue texture: waves (cycles across the image in x, in y, phase, grey-level amplitude)."""
    structures: tuple[tuple[float, float, float, float], ...] = ()
    """Internal structures (vessels, ventricles): (x, y, radius, grey-level contrast), fractions of the side."""


SLICE_STEP = 0.02
"""How far one slice moves through a volume (of the range -0.4..0.4 the slices bounce within)."""


def anatomy(seed: int, index: int, slices_per_patient: int) -> Anatomy:
    """Row `index`'s anatomy with `volumes`: the patient's body, cut at this row's slice.

    Sizes were chosen by measuring pHash distances (`radscribe.data.similar`, 64 bits) at 256 and 512 px: with
    the outline harmonics and texture waves, different patients came within 4 bits in ~5e-6 of pairs (the
    template: ~3e-4, enough to chain thousands of patients into one near-duplicate group at 16k rows), while ~85 %
    of adjacent slices stayed within 4 bits. Each part is kept faint enough that the findings stay visible.
    """
    patient, slice_no = divmod(index, max(1, slices_per_patient))
    rng = _rng("anatomy", seed, patient)
    scale, offset, phase = rng.uniform(0.92, 1.0, 2), rng.uniform(-0.02, 0.02, 2), rng.uniform(0, 2 * np.pi)
    # The slice position bounces within [-0.4, 0.4], however many slices there are; every part of the body
    # changes smoothly with it.
    z = rng.uniform(-0.4, 0.4) + SLICE_STEP * slice_no
    z = 0.4 - abs((z + 0.4) % 1.6 - 0.8)
    cut = math.sqrt(1 - z * z)  # a cut through an ellipsoid: the outline narrows away from the centre slice
    outline = tuple((float(k), rng.uniform(0, 0.06), rng.uniform(0, 2 * np.pi) + rng.uniform(1, 3) * z)
                    for k in range(2, 7))
    texture = tuple((float(fx), float(fy), rng.uniform(0, 2 * np.pi) + rng.uniform(2, 6) * z, rng.uniform(3, 5))
                    for fx, fy in rng.integers(-4, 5, (6, 2)))
    structures = []
    for _ in range(4):
        x, y, radius = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.1)
        contrast = rng.choice([-1.0, 1.0]) * rng.uniform(10, 20)  # well below a lesion's, so findings stay visible
        wander, turn = rng.uniform(0, 2 * np.pi, 2)
        structures.append((x + 0.08 * math.sin(3 * z + wander), y + 0.08 * math.cos(3 * z + wander),
                           radius * (0.85 + 0.15 * math.cos(4 * z + turn)), contrast))
    return Anatomy(scale=(scale[0] * cut, scale[1] * cut), offset=(offset[0], offset[1]), outline=outline,
                   phase=phase, speckle_seed=patient, texture=texture, structures=tuple(structures))


_BASE_CACHE: dict = {}


def _base_image(modality: str, organ: str, size: int, body: Anatomy = Anatomy()) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free phantom (float32 grey levels) and the organ mask; the shared template is cached per process."""
    key = (modality, organ, size)
    if body == Anatomy() and key in _BASE_CACHE:
        return _BASE_CACHE[key]
    background, tissue, _ = MODALITY_LEVELS[modality]
    # A column and a row that broadcast: the same values as full coordinate grids at a fraction of the work.
    yy, xx = (grid.astype(np.float32) / size for grid in np.ogrid[0:size, 0:size])
    dx, dy = xx - 0.5 - body.offset[0], yy - 0.5 - body.offset[1]
    shape, a, b = ORGAN_SHAPE[organ]
    a, b = a * body.scale[0], b * body.scale[1]
    power = 2 if shape == "ellipse" else 4
    radius = np.abs(dx / a) ** power + np.abs(dy / b) ** power
    if body.outline:
        angle = np.arctan2(dy, dx)
        radius = radius / (1 + sum(amp * np.cos(k * angle + phase) for k, amp, phase in body.outline)) ** power
    mask = radius <= 1.0
    img = np.full((size, size), background, np.float32)
    img[mask] = tissue
    for x, y, r, contrast in body.structures:
        # Only the structure's bounding box is computed (each row renders its own anatomy); soft 1.5 px edge.
        y0, y1 = max(0, int((y - r) * size) - 2), min(size, int((y + r) * size) + 3)
        x0, x1 = max(0, int((x - r) * size) - 2), min(size, int((x + r) * size) + 3)
        box = np.s_[y0:y1, x0:x1]
        weight = np.clip((r - np.sqrt((xx[:, x0:x1] - x) ** 2 + (yy[y0:y1] - y) ** 2)) * size / 1.5 + 0.5, 0.0, 1.0)
        img[box] += np.where(mask[box], contrast * weight, 0)
    for fx, fy, phase, amplitude in body.texture:
        # cos(a + b) from two 1-D factors: a wave over the whole image for the price of an outer product.
        ax, ay = 2 * np.pi * fx * xx + phase, 2 * np.pi * fy * yy
        img += np.where(mask, amplitude * (np.cos(ax) * np.cos(ay) - np.sin(ax) * np.sin(ay)), 0)
    if organ == "brain":  # bright skull ring
        img[(radius > 0.80) & mask] = tissue + 95
    elif organ == "lung":  # horizontal rib bands
        img += np.where(mask, 22 * (np.sin(yy * 2 * np.pi * 7 + body.phase) > 0.6), 0)
    elif organ == "liver":  # fixed speckle
        speck = np.random.default_rng(body.speckle_seed).random((size, size)) > 0.9
        img += np.where(mask & speck, 30, 0)
    elif organ == "kidney":  # vertical bands
        img += np.where(mask, 18 * (np.sin(xx * 2 * np.pi * 6 + body.phase) > 0.3), 0)
    if modality == "MRI":  # bias field across the image
        img = np.where(mask, img * (0.8 + 0.4 * xx), img)
    elif modality == "X-ray":  # projection gradient + blurred edges
        img = img * (0.75 + 0.5 * yy)
        img = _box_blur(img, max(1, size // 64))
    img = img.astype(np.float32)
    if body == Anatomy():
        _BASE_CACHE[key] = (img, mask)
    return img, mask


def _box_blur(img: np.ndarray, r: int) -> np.ndarray:
    pad = np.pad(img, r, mode="edge")
    cs = pad.cumsum(0).cumsum(1)
    cs = np.pad(cs, ((1, 0), (1, 0)))
    k = 2 * r + 1
    h, w = img.shape
    return (cs[k:k + h, k:k + w] - cs[:h, k:k + w] - cs[k:k + h, :w] + cs[:h, :w]) / (k * k)


def render(truth: dict, seed: int, index: int, size: int, body: Anatomy = Anatomy()) -> np.ndarray:
    """The phantom for `truth` as an RGB uint8 array; noise and a small jitter vary per slice."""
    rng = _rng("image", seed, index)
    base, mask = _base_image(truth["modality"], truth["organ"], size, body)
    img = base.copy()
    if truth["finding"] != "normal":
        cx, cy = LOCATION_XY[truth["location"]]
        cx, cy = (cx + rng.uniform(-0.02, 0.02)) * size, (cy + rng.uniform(-0.02, 0.02)) * size
        r = LESION_RADIUS[truth["size"]] * size
        yy, xx = np.ogrid[0:size, 0:size]
        dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        # Soft 1.5 px edge: a blob, not an aliased stamp.
        weight = np.clip((r - dist) / 1.5 + 0.5, 0.0, 1.0)
        tissue = MODALITY_LEVELS[truth["modality"]][1]
        img += weight * (tissue + LESION_CONTRAST[truth["density"]] - img) * 0.9
    sigma = MODALITY_LEVELS[truth["modality"]][2]
    if truth["modality"] == "MRI":
        img += np.abs(rng.normal(0, sigma, img.shape)).astype(np.float32)  # Rician-like floor
    else:
        img += rng.normal(0, sigma, img.shape).astype(np.float32)
    grey = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def encode(pixels: np.ndarray, fmt: str, quality: int = 92) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    else:
        Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


# --- parquet shards -----------------------------------------------------------------------------------------
def _schema():
    import pyarrow as pa

    fields = [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("id", pa.string()),
              ("caption", pa.string()), ("patient", pa.string()), ("source", pa.string()),
              ("modality", pa.string()), ("organ", pa.string()), ("location", pa.string()),
              ("density", pa.string()), ("size", pa.string()), ("area_pct", pa.float64()),
              ("finding", pa.string())]
    # The `huggingface` metadata makes `datasets.load_dataset("parquet")` decode `image` as an Image feature.
    features = {name: {"dtype": "string", "_type": "Value"} for name, _ in fields}
    features["image"] = {"_type": "Image"}
    features["area_pct"] = {"dtype": "float64", "_type": "Value"}
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema(fields, metadata=meta)


def _write_shard(args: tuple) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg_dict, shard, start, stop = args
    cfg = SynthConfig(**cfg_dict)
    ext = "jpg" if cfg.format == "jpeg" else "png"
    columns: dict[str, list] = {name: [] for name in _schema().names}
    for index in range(start, stop):
        truth = sample_truth(cfg.seed, index, cfg.slices_per_patient, cfg.normal_fraction)
        body = anatomy(cfg.seed, index, cfg.slices_per_patient) if cfg.volumes else Anatomy()
        data = encode(render(truth, cfg.seed, index, cfg.size, body), cfg.format, cfg.jpeg_quality)
        columns["image"].append({"bytes": data, "path": f"{truth['id']}.{ext}"})
        columns["caption"].append(report(truth, cfg.lang))
        for name in ("id", "patient", "source", "modality", "organ", "location", "density", "size", "area_pct",
                     "finding"):
            columns[name].append(truth[name])
    out = Path(cfg.out)
    path = out / f"shard-{shard:05d}.parquet"
    tmp = out / f".{path.name}.tmp"
    # Small row groups let `prepare` stream and parallelise without holding a shard in memory.
    # JPEG/PNG bytes do not compress: storing them plain saves every reader a decompression pass.
    compression = {name: "zstd" for name in columns}
    compression["image"] = "none"
    pq.write_table(pa.table(columns, schema=_schema()), tmp, row_group_size=256, compression=compression)
    os.replace(tmp, path)
    return str(path)


def synth(cfg: SynthConfig | dict | None = None, **kwargs) -> list[Path]:
    """Write the parquet shards; returns their paths. Accepts a SynthConfig, a dict, or keyword arguments."""
    from tqdm import tqdm

    if cfg is None or isinstance(cfg, dict):
        cfg = SynthConfig(**{**(cfg or {}), **kwargs})
    _check(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    starts = range(0, cfg.n, cfg.shard_rows)
    jobs = [(asdict(cfg), i, s, min(s + cfg.shard_rows, cfg.n)) for i, s in enumerate(starts)]
    workers = cfg.workers or (min(len(jobs), os.cpu_count() or 1) if len(jobs) > 1 else 1)
    bar = tqdm(total=cfg.n, unit="img", desc="synth", disable=None)
    paths = []
    if workers <= 1:
        for job in jobs:
            paths.append(Path(_write_shard(job)))
            bar.update(job[3] - job[2])
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for job, path in zip(jobs, pool.imap(_write_shard, jobs)):
                paths.append(Path(path))
                bar.update(job[3] - job[2])
    bar.close()
    # Shards of an earlier, larger run in the same folder would otherwise be read as part of this one.
    for stale in sorted(out.glob("shard-*.parquet")):
        if stale not in paths:
            stale.unlink()
    return paths


def _check(cfg: SynthConfig) -> None:
    if cfg.n < 1:
        raise RadscribeError(f"--n must be at least 1, got {cfg.n}")
    if not 32 <= cfg.size <= 4096:
        raise RadscribeError(f"--size must be between 32 and 4096 pixels, got {cfg.size}")
    if cfg.shard_rows < 1 or cfg.slices_per_patient < 1:
        raise RadscribeError("--shard-rows and --slices-per-patient must be at least 1")
    if not 0.0 <= cfg.normal_fraction <= 1.0:
        raise RadscribeError(f"normal_fraction must be within [0, 1], got {cfg.normal_fraction}")
    if cfg.lang not in REPORT_TEMPLATES or cfg.format not in ("jpeg", "png"):
        raise RadscribeError(f"--lang must be zh or en and --format jpeg or png (got {cfg.lang}, {cfg.format})")
