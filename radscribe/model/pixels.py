"""The one image policy: how many pixels an image keeps when the model sees it, the same in training and serving.

Qwen-VL processors size every image themselves (`smart_resize`: sides rounded to multiples of patch x merge,
the area brought inside [`size.shortest_edge`, `size.longest_edge`] pixels, the aspect kept), so the policy is
those two numbers on the processor, and every stage sizes images by applying the processor:

- `radscribe train` sets them from `data.image_min_pixels` / `data.image_max_pixels` (`set_pixel_limits`) and
  saves that processor into RUN/adapter/ (or RUN/model/);
- eval, chat, serve, the web preview and export load a run's processor limits back (`load_model(adapter=RUN)`
  calls `apply_trained_limits`; `trained_limits` also bounds them by RUN/config.yaml for runs saved before the
  limits were recorded), so a 1024x1024 image is the same number of tokens in all of them;
- a base model without a run keeps its own processor's limits (Qwen3-VL as published: 65,536 to 16,777,216 px,
  64 to 16,384 tokens), and `describe` says which limits are in force and where they came from.

    from radscribe.model.pixels import pixel_limits, set_pixel_limits, image_tokens
    set_pixel_limits(processor, 32 * 32, 768 * 768)
    image_tokens(processor, 1024, 1024)     # 576 with patch 16, merge 2
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from radscribe.errors import RadscribeError

# Where a saved processor keeps its image processor settings: transformers 5 nests them in processor_config.json,
# older writers (transformers 4.x, LLaMA-Factory) use preprocessor_config.json.
_NESTED, _FLAT = "processor_config.json", "preprocessor_config.json"


@dataclass(frozen=True)
class PixelLimits:
    """The image policy in force: the pixel range every image is brought into, and where it came from."""

    min_pixels: int
    max_pixels: int
    source: str
    """e.g. "run runs/r1 (data.image_min_pixels/image_max_pixels)" or "the base processor of MODEL"."""


def pixel_limits(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of `processor`'s image processor (its `size` shortest/longest edge)."""
    size = processor.image_processor.size
    return int(size["shortest_edge"]), int(size["longest_edge"])


def set_pixel_limits(processor, min_pixels: int, max_pixels: int) -> None:
    """Make `processor` bring every image into [min_pixels, max_pixels] (it lowers the published floor too)."""
    from transformers.image_utils import SizeDict

    _check(min_pixels, max_pixels, "data.image_min_pixels / data.image_max_pixels")
    processor.image_processor.size = SizeDict(shortest_edge=int(min_pixels), longest_edge=int(max_pixels))


def image_tokens(processor, width: int, height: int) -> int:
    """Placeholder tokens a width x height image becomes under `processor`'s policy (no pixels decoded)."""
    image_processor = processor.image_processor
    return image_processor.get_number_of_image_patches(height, width, {}) // image_processor.merge_size ** 2


def sized(processor, image, limits: tuple[int, int] | None = None):
    """`image` resized to what `processor` (under `limits`, default its own) would resize it to, with the
    processor's own rule (`smart_resize` of its module) and filter: the processor then finds nothing to resize,
    so the pixels it sees are the same. Processors without Qwen-VL's dynamic size are left to do their own."""
    import sys

    image_processor = getattr(processor, "image_processor", None)
    # The size rule of the processor's own module (the PIL and the torchvision backends each define it).
    smart_resize = getattr(sys.modules.get(type(image_processor).__module__), "smart_resize", None)
    if limits is None:
        size = getattr(image_processor, "size", None)
        limits = (getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None))
    if smart_resize is None or not getattr(image_processor, "do_resize", False) or None in limits:
        return image
    height, width = smart_resize(image.height, image.width,
                                 factor=image_processor.patch_size * image_processor.merge_size,
                                 min_pixels=limits[0], max_pixels=limits[1])
    if (width, height) == image.size:
        return image
    return image.resize((width, height), resample=image_processor.resample)


def _saved_settings(folder: str | Path):
    """(file, its whole JSON, the image processor's settings within it) for each processor file in `folder`."""
    for name in (_NESTED, _FLAT):
        path = Path(folder) / name
        if path.is_file():
            whole = json.loads(path.read_text(encoding="utf-8"))
            settings = whole.get("image_processor") if name == _NESTED else whole
            if isinstance(settings, dict):
                yield path, whole, settings


def saved_limits(folder: str | Path) -> tuple[int, int] | None:
    """The pixel limits of the processor saved in `folder` (a run's adapter/ or model/, an export), or None."""
    for _, _, settings in _saved_settings(folder):
        size = settings.get("size") or {}
        low = size.get("shortest_edge", settings.get("min_pixels"))
        high = size.get("longest_edge", settings.get("max_pixels"))
        if low is not None and high is not None:
            return int(low), int(high)
    return None


def trained_limits(adapter_dir: str | Path) -> tuple[int, int] | None:
    """The pixel range images had when the adapter at `adapter_dir` was trained, or None when nothing says.

    The processor saved beside the adapter says it. In a radscribe run folder, RUN/config.yaml's data section
    bounds it too: runs trained before the limits were set on the processor saved the base processor's range,
    while training had capped images at data.image_max_pixels (and the processor's floor still applied), so the
    range in force was the intersection of the two; for newer runs both say the same."""
    saved = saved_limits(adapter_dir)
    if saved is None:
        return None
    config = Path(adapter_dir).parent / "config.yaml"
    if not config.is_file():
        return saved
    import yaml

    data = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data") or {}
    low, high = data.get("image_min_pixels"), data.get("image_max_pixels")
    return (max(saved[0], int(low)) if low is not None else saved[0],
            min(saved[1], int(high)) if high is not None else saved[1])


def apply_trained_limits(processor, adapter_dir: str | Path) -> PixelLimits | None:
    """Give `processor` the pixel limits the adapter at `adapter_dir` was trained with (`trained_limits`);
    None, and `processor` unchanged, when that folder saved no processor."""
    limits = trained_limits(adapter_dir)
    if limits is None:
        return None
    _check(*limits, f"{adapter_dir}: the saved processor's size")
    set_pixel_limits(processor, *limits)
    return PixelLimits(*limits, source=f"the processor saved with {adapter_dir}")


def write_limits(folder: str | Path, min_pixels: int, max_pixels: int) -> None:
    """Write the pixel limits into every processor file of a saved folder (an export), so every loader reads the
    same policy: transformers 5 reads processor_config.json, transformers 4.x and vLLM's HF processor
    preprocessor_config.json."""
    for path, whole, settings in list(_saved_settings(folder)):
        settings["size"] = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
        for legacy in ("min_pixels", "max_pixels"):  # Qwen2.5-VL's published keys would override `size`
            settings.pop(legacy, None)
        path.write_text(json.dumps(whole, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def describe(processor, limits: PixelLimits) -> str:
    """One line saying which image policy is in force and what it costs, for the logs of eval, chat and serve."""
    side = 1024
    return (f"images: brought into {limits.min_pixels:,}-{limits.max_pixels:,} pixels ({limits.source}); "
            f"a {side}x{side} image is {image_tokens(processor, side, side):,} image tokens")


def _check(min_pixels: int, max_pixels: int, what: str) -> None:
    if not 0 < min_pixels <= max_pixels:
        raise RadscribeError(f"{what}: the pixel range [{min_pixels}, {max_pixels}] is empty; the minimum must be "
                             "positive and at most the maximum")


def policy(processor, model_dir: str | Path, adapter_dir: str | Path | None = None) -> PixelLimits:
    """The limits `processor` applies (as `load_model` left it), named by where they came from."""
    low, high = pixel_limits(processor)
    if adapter_dir is not None and trained_limits(adapter_dir) == (low, high):
        source = f"as trained: the processor saved with {adapter_dir}"
    elif adapter_dir is not None:
        source = f"{adapter_dir} saved no processor, so the base processor's own limits ({model_dir})"
    else:
        source = f"the processor of {model_dir}, no run given"
    return PixelLimits(low, high, source)
