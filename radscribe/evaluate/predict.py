"""`radscribe eval`: generate reports for a dataset split, score them as LLaMA-Factory does, and beyond.

Run as: radscribe eval --model BASE [--adapter RUN] --data DATASET [--split val] [--batch-size 8]
                       [--max-new-tokens 512] [--limit N] [--ablate blank|shuffle] [--out DIR]
        radscribe eval --endpoint URL --data DATASET --out DIR [--concurrency 4] [--api-key-env VAR]
                       (any OpenAI-compatible server generates: radscribe/evaluate/endpoint.py)
        radscribe score generated_predictions.jsonl [--out DIR]

Where outputs live: `DIR/<split>[-<ablation>]/`, with DIR = `--out`, or `RUN/eval` when an adapter run is given
(a base-model eval has no run folder, so it needs `--out`). Each folder holds:
  generated_predictions.jsonl  {"prompt", "predict", "label", "id", "image"[, "truth"]} per line (LLaMA-Factory's
                               keys first, so its tools and ours read the same file)
  predict_results.json         exactly LLaMA-Factory's keys: predict_bleu-4, predict_rouge-1/-2/-l, predict_runtime,
                               predict_samples_per_second, predict_steps_per_second
  scores.json                  every score with its bootstrap 95 % CI (BLEU/ROUGE, finding-level, hallucination,
                               ground-truth accuracy on synthetic data), the config and the sample count
  per_sample.jsonl             the per-sample columns behind scores.json (the report's paired comparisons use them)
  ablation.json                (ablation runs) each score on real vs ablated images, the drop and its paired CI
While generating, finished batches go to generated_predictions.partial.jsonl: rerunning an interrupted eval with the
same settings resumes there.

Rerunning a finished eval: scores.json records the settings it was made with (model, adapter, data, split, limit,
generation settings, and a fingerprint of the model, adapter and split files; for an endpoint eval its URL and the
served model id). With the same settings the saved results are reused (and said so); with other settings the eval
refuses to replace them and names what differs. What a server serves cannot be fingerprinted from here: after it is
given other weights under the same URL and model id, pass --overwrite.
`--overwrite` redoes the eval in either case (another `--out` keeps both). An ablation treats the real-image eval it
is compared with by the same rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from radscribe.errors import RadscribeError
from radscribe.evaluate import findings, metrics, stats


@dataclass
class EvalConfig:
    data: str
    """Prepared dataset folder (or any LLaMA-Factory sharegpt folder with images)."""
    model: str | None = None
    """Base model folder (as downloaded, or written by `radscribe tiny-model`); required unless --endpoint."""
    adapter: str | None = None
    """A `radscribe train` run folder (or its adapter/ folder); none evaluates the base model."""
    split: str = "val"
    """Which split to evaluate."""
    batch_size: int = 8
    """Requests per generate call (left-padded)."""
    max_new_tokens: int = 512
    """Generation budget per report."""
    limit: int | None = None
    """Evaluate only the first N samples of the split."""
    ablate: Literal["blank", "shuffle"] | None = None
    """Image-grounding check: rerun with black images or with images shuffled between samples."""
    out: str | None = None
    """Output root; results go to OUT/<split>[-<ablate>]/. Default: RUN/eval when an adapter run is given."""
    temperature: float = 0.0
    """0 = greedy (the comparable setting, and the default whatever the model's generation_config.json says);
    above 0 samples."""
    top_p: float = 1.0
    """Nucleus mass when sampling."""
    top_k: int = 0
    """Sample among the k likeliest tokens when sampling; 0 = all."""
    repetition_penalty: float = 1.0
    """Penalty on tokens already generated, greedy too; 1 = none (the model's own value is not applied)."""
    seed: int = 0
    """Seed of sampling, of the shuffle ablation and of the bootstrap."""
    dtype: str = "auto"
    """Model dtype: auto, bf16, fp16, fp32."""
    n_boot: int = 1000
    """Bootstrap resamples for the confidence intervals."""
    workers: int = 1
    """Processes for BLEU/ROUGE scoring."""
    overwrite: bool = False
    """Redo the eval even when the output folder holds results (else same settings reuse them, others refuse)."""
    endpoint: str | None = None
    """OpenAI base URL (http://HOST:PORT/v1) of a server that generates instead of a local model (no --model).
    Any OpenAI-compatible one: radscribe serve, llama-server, vLLM, SGLang; --adapter, --dtype and --batch-size
    are then the server's business and refused here."""
    endpoint_model: str | None = None
    """Model id to request from --endpoint (default: the one model its /models lists)."""
    concurrency: int = 1
    """Requests in flight at once against --endpoint."""
    api_key_env: str | None = None
    """Environment variable holding the --endpoint's API key (sent as `Authorization: Bearer`)."""
    request_timeout_s: float = 600.0
    """Longest wait for one --endpoint answer."""
    max_retries: int = 8
    """Retries of a request the --endpoint answers 429 or 503 (after its Retry-After)."""


def output_dir(cfg: EvalConfig) -> Path:
    """OUT/<split>[-<ablate>] (see the module docstring)."""
    if cfg.out:
        root = Path(cfg.out)
    elif cfg.adapter:
        adapter = _resolved_adapter(cfg.adapter)
        root = (adapter.parent if adapter.name == "adapter" else adapter) / "eval"
    else:
        raise RadscribeError("evaluating a base model (no --adapter) needs --out DIR for the results")
    return root / (f"{cfg.split}-{cfg.ablate}" if cfg.ablate else cfg.split)


def evaluate(cfg: EvalConfig, engine=None) -> dict:
    """Generate, score and save one split; returns scores.json's content. `engine` reuses a loaded Engine (or an
    Endpoint)."""
    from radscribe.data.dataset import read_split

    cfg, engine = _checked(cfg, engine)
    out = output_dir(cfg)
    samples = list(read_split(cfg.data, cfg.split))
    if cfg.limit is not None:
        samples = samples[:cfg.limit]
    if not samples:
        raise RadscribeError(f"{cfg.data}: split {cfg.split!r} has no samples")
    settings = _settings(cfg)
    saved = _saved_results(out, settings, [s.id for s in samples], cfg.overwrite)
    if saved is not None:
        print(f"{out}: already evaluated with these settings, reusing it (--overwrite redoes it)")
        print(format_scores(saved, title=f"{out}"))
        return saved
    if cfg.ablate:  # before the model loads: a real-image eval made with other settings is refused now, not later
        real_cfg = dataclasses.replace(cfg, ablate=None)
        try:
            _saved_results(output_dir(real_cfg), _settings(real_cfg), [s.id for s in samples], cfg.overwrite)
        except RadscribeError as err:
            raise RadscribeError(f"the ablation is compared with real images under the same settings: {err}") from None
    if engine is None:
        from radscribe.serve.engine import Engine

        engine = Engine.from_pretrained(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, batch_size=cfg.batch_size)

    real = None
    if cfg.ablate:
        # The drop is measured against real images on the same samples and settings: that eval is reused when it
        # was made with the same settings, made now when missing, and refused when it differs (unless --overwrite).
        real_cfg = dataclasses.replace(cfg, ablate=None)
        evaluate(real_cfg, engine)
        real = load_per_sample(output_dir(real_cfg))[1]

    rows, runtime, steps = _predict(cfg, engine, samples, out)
    result = score_rows(rows, cfg.n_boot, cfg.seed, cfg.workers)
    predict_results = {**result["predict"], "predict_runtime": round(runtime, 4),
                       "predict_samples_per_second": round(len(rows) / runtime, 3),
                       "predict_steps_per_second": round(steps / runtime, 3)}
    scores = {"n": len(rows), "split": cfg.split, "ablate": cfg.ablate, "predict_results": predict_results,
              "metrics": result["metrics"], "settings": settings, "config": dataclasses.asdict(cfg)}
    policy = getattr(engine, "image_policy", None)  # the run's image policy, as the engine applied it
    if policy is not None:
        scores["image_pixels"] = {"min": policy.min_pixels, "max": policy.max_pixels, "source": policy.source}

    if real is not None:
        scores["ablation"] = ablation_drop(real, result["columns"], cfg.n_boot, cfg.seed)

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("scores.json", "ablation.json"):  # replaced results (--overwrite) are gone before new ones land
        (out / stale).unlink(missing_ok=True)
    _write_jsonl(out / "generated_predictions.jsonl", rows)
    _write_json(out / "predict_results.json", predict_results)
    _write_jsonl(out / "per_sample.jsonl", _per_sample_rows(rows, result["columns"]))
    if real is not None:
        _write_json(out / "ablation.json", scores["ablation"])
    _write_json(out / "scores.json", scores)  # last: its presence marks the folder's results complete
    (out / "generated_predictions.partial.jsonl").unlink(missing_ok=True)
    print(format_scores(scores, title=f"{out}"))
    return scores


def _checked(cfg: EvalConfig, engine):
    """Options that cannot take effect together are refused; an endpoint's model id is resolved (it is recorded)."""
    if not cfg.endpoint:
        if not cfg.model:
            raise RadscribeError("--model is required (model), or --endpoint URL to evaluate through a server")
        stray = [flag for flag, given in (("--concurrency", cfg.concurrency != EvalConfig.concurrency),
                                          ("--api-key-env", cfg.api_key_env), ("--endpoint-model", cfg.endpoint_model),
                                          ("request_timeout_s", cfg.request_timeout_s != EvalConfig.request_timeout_s),
                                          ("max_retries", cfg.max_retries != EvalConfig.max_retries)) if given]
        if stray:
            raise RadscribeError(f"{', '.join(stray)} only appl{'y' if len(stray) > 1 else 'ies'} with --endpoint URL")
        return cfg, engine
    stray = [flag for flag, given in (("--model", cfg.model), ("--adapter", cfg.adapter),
                                      ("--dtype", cfg.dtype != EvalConfig.dtype),
                                      ("--batch-size", cfg.batch_size != EvalConfig.batch_size))
             if given]
    if stray:
        raise RadscribeError(f"{', '.join(stray)} cannot take effect with --endpoint: the server loads and batches "
                             "the model (set them where it is started)")
    if not cfg.out:
        raise RadscribeError("an --endpoint eval has no run folder: pass --out DIR for the results")
    if engine is None:
        from radscribe.evaluate.endpoint import Endpoint

        engine = Endpoint.from_config(cfg)
    return dataclasses.replace(cfg, endpoint_model=engine.model), engine


def _saved_results(out: Path, settings: dict, ids: list[str], overwrite: bool) -> dict | None:
    """The scores saved in `out` when they were made with `settings` on `ids`; None when there are none to keep.

    Results made with other settings raise, naming what differs; `overwrite` discards any saved results.
    """
    path = out / "scores.json"
    if overwrite or not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    loaded = load_per_sample(out)
    differs = _differences(saved.get("settings"), settings)
    if loaded is None or loaded[0] != ids:
        differs.append("the evaluated samples")
    if not differs:
        return saved
    raise RadscribeError(f"{out} already holds an eval of {saved.get('n', '?')} samples made with other settings "
                         f"({'; '.join(differs)}); pass --overwrite to replace it, or --out DIR to keep both")


def _differences(old: dict | None, new: dict) -> list[str]:
    if not isinstance(old, dict):
        return ["no settings recorded (written by an older radscribe)"]
    out = []
    for key, value in new.items():
        if old.get(key) == value:
            continue
        if key.endswith("_files"):
            out.append(f"the {key[:-len('_files')]} files changed")
        else:
            out.append(f"{key} {old.get(key)!r} -> {value!r}")
    return out


def _predict(cfg: EvalConfig, engine, samples, out: Path) -> tuple[list[dict], float, int]:
    """Generate one report per sample, `batch_size` at a time; images are loaded per batch.

    Each finished batch is appended to OUT/generated_predictions.partial.jsonl, so an interrupted eval resumes
    where it stopped when rerun with the same settings (batch size aside: batched greedy equals batch-1 output).
    """
    from tqdm import tqdm

    from radscribe.data.dataset import to_chat
    from radscribe.serve.engine import Request, load_request_image

    image_of = _image_plan(cfg, samples)

    def request_for(index: int) -> Request:
        sample = samples[index]
        images = [_ablated(load_request_image(p), cfg.ablate) for p in image_of(index)]
        return Request(messages=to_chat(sample.messages[:_last_assistant(sample)], images),
                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                       top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)

    partial = out / "generated_predictions.partial.jsonl"
    rows, runtime, steps = _resume(partial, cfg, samples)
    out.mkdir(parents=True, exist_ok=True)
    # Rewritten whole: drops a batch line cut off by the interruption before new batches are appended.
    header = json.dumps({"settings": _settings(cfg)}) + "\n"
    saved = json.dumps({"seconds": runtime, "steps": steps, "rows": rows}, ensure_ascii=False) + "\n"
    partial.write_text(header + (saved if rows else ""), encoding="utf-8")
    with tqdm(total=len(samples), initial=len(rows), unit="sample",
              desc=f"eval {cfg.split}" + (f" ({cfg.ablate})" if cfg.ablate else "")) as bar, \
            partial.open("a", encoding="utf-8") as log:
        todo = range(len(rows), len(samples))
        if cfg.endpoint:  # one request per sample, `concurrency` in flight, answers taken in sample order
            chunks = engine.chunks(request_for, todo, lambda i: samples[i].id)
        else:
            chunks = _local_batches(engine, request_for, todo, cfg.batch_size)
        for indices, answers, seconds in chunks:
            batch_rows = []
            for index, answer in zip(indices, answers):
                sample = samples[index]
                row = {"prompt": sample.prompt, "predict": answer, "label": sample.report, "id": sample.id,
                       "image": [str(Path(p).resolve()) for p in sample.images]}
                if sample.truth:
                    row["truth"] = sample.truth
                batch_rows.append(row)
            log.write(json.dumps({"seconds": seconds, "rows": batch_rows}, ensure_ascii=False) + "\n")
            log.flush()
            rows += batch_rows
            runtime += seconds
            steps += 1
            bar.update(len(indices))
    return rows, runtime, steps


def _local_batches(engine, request_for, indices: range, batch_size: int):
    """(indices, answers, seconds) per batch of `batch_size` samples, images loaded per batch."""
    for first in range(indices.start, indices.stop, batch_size):
        start = time.perf_counter()
        batch = list(range(first, min(first + batch_size, indices.stop)))
        answers = engine.generate([request_for(i) for i in batch], batch_size=batch_size)
        yield batch, answers, time.perf_counter() - start


def _settings(cfg: EvalConfig) -> dict:
    """What must not change for saved predictions to be reused: the evaluated files and the generation settings.

    Paths are resolved and each folder is fingerprinted (names, sizes and modification times of its files), so a
    retrained adapter or a re-prepared split at the same path does not pass for the old one.
    """
    keep = ("split", "limit", "ablate", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
            "seed", "dtype")
    adapter = _resolved_adapter(cfg.adapter)
    model = Path(cfg.model) if cfg.model else None
    return {"model": str(model.resolve()) if model else None, "adapter": str(adapter) if adapter else None,
            "data": str(Path(cfg.data).resolve()), **{k: getattr(cfg, k) for k in keep},
            "model_files": _fingerprint(model), "adapter_files": _fingerprint(adapter),
            "data_files": _fingerprint(Path(cfg.data), f"{cfg.split}.json*"),
            "endpoint": cfg.endpoint.rstrip("/") if cfg.endpoint else None, "endpoint_model": cfg.endpoint_model}


def _resolved_adapter(adapter: str | None) -> Path | None:
    if not adapter:
        return None
    from radscribe.model.load import resolve_adapter

    return resolve_adapter(adapter).resolve()


def _fingerprint(folder: Path | None, pattern: str = "*") -> str | None:
    """A short hash of the names, sizes and modification times of the files `pattern` matches in `folder`."""
    if folder is None or not folder.is_dir():
        return None
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob(pattern) if p.is_file())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def _resume(partial: Path, cfg: EvalConfig, samples) -> tuple[list[dict], float, int]:
    """Rows, generation seconds and steps saved by an interrupted run with the same settings, else nothing."""
    if not partial.is_file():
        return [], 0.0, 0
    rows, runtime, steps = [], 0.0, 0
    lines = partial.read_text(encoding="utf-8").splitlines()
    try:
        if not lines or json.loads(lines[0]).get("settings") != _settings(cfg):
            return [], 0.0, 0
        for line in lines[1:]:
            entry = json.loads(line)
            rows += entry["rows"]
            runtime += entry["seconds"]
            steps += entry.get("steps", 1)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        pass  # a batch cut off mid-write: keep the batches read so far
    if [r["id"] for r in rows] != [s.id for s in samples[:len(rows)]]:
        return [], 0.0, 0
    if rows:
        print(f"resuming {partial}: {len(rows)} of {len(samples)} samples already generated")
    return rows, runtime, steps


def _image_plan(cfg: EvalConfig, samples):
    """index -> the image paths shown for sample `index` (another sample's under the shuffle ablation)."""
    if cfg.ablate != "shuffle":
        return lambda i: samples[i].images
    if len(samples) < 2:
        raise RadscribeError("--ablate shuffle needs at least 2 samples")
    # A random cycle: every sample gets some other sample's image, never its own.
    order = list(range(len(samples)))
    random.Random(cfg.seed).shuffle(order)
    donor = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    return lambda i: samples[donor[i]].images


def _ablated(image, ablate):
    if ablate == "blank":
        from PIL import Image

        return Image.new("RGB", image.size, (0, 0, 0))
    return image


def _last_assistant(sample) -> int:
    for i in range(len(sample.messages) - 1, -1, -1):
        if sample.messages[i]["role"] == "assistant":
            return i
    raise RadscribeError(f"sample {sample.id} has no assistant message (the reference report)")


# --- scoring -----------------------------------------------------------------------------------------------------
def score_rows(rows: list[dict], n_boot: int = 1000, seed: int = 0, workers: int = 1) -> dict:
    """{"predict": LLaMA-Factory means, "metrics": name -> {value, low, high}, "columns": per-sample columns}."""
    predicts, labels = [r["predict"] for r in rows], [r["label"] for r in rows]
    per_sample = metrics.score_pairs(predicts, labels, workers=workers)
    cols = {key: np.array([s[key] for s in per_sample]) for key in metrics.METRICS}
    cols.update(findings.columns(predicts, labels, [r.get("truth") or {} for r in rows]))
    return {"predict": metrics.aggregate(per_sample),
            "metrics": stats.bootstrap(cols, statistics_for(cols), n_boot=n_boot, seed=seed),
            "columns": cols}


def statistics_for(cols: dict) -> dict:
    """Every reported score: BLEU/ROUGE means, then the finding-level ratios."""
    return {**stats.mean_statistics(metrics.METRICS), **findings.finding_statistics(cols)}


def ablation_drop(real: dict, ablated: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """score -> {"real", "ablated", "drop" (real - ablated), "low", "high"} with a paired bootstrap CI of the drop."""
    compared = stats.paired(ablated, real, statistics_for(real), n_boot=n_boot, seed=seed)
    return {name: {"real": c["b"], "ablated": c["a"], "drop": c["diff"], "low": c["low"], "high": c["high"]}
            for name, c in compared.items()}


def score_file(path: str | Path, out: str | Path | None = None, n_boot: int = 1000, seed: int = 0,
               workers: int = 1) -> dict:
    """`radscribe score`: score an existing prediction file (ours, LLaMA-Factory's or vLLM's)."""
    rows = metrics.read_predictions(path)
    start = time.perf_counter()
    result = score_rows(rows, n_boot, seed, workers)
    scores = {"n": len(rows), "source": str(path), "predict_results": result["predict"],
              "metrics": result["metrics"], "score_runtime": round(time.perf_counter() - start, 4)}
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "scores.json", scores)
        _write_json(out / "predict_results.json", result["predict"])
        _write_jsonl(out / "per_sample.jsonl", _per_sample_rows(rows, result["columns"]))
    print(format_scores(scores, title=str(path)))
    return scores


def format_scores(scores: dict, title: str = "") -> str:
    """A plain-text table: score, value, 95 % CI (and the ablation drop when present)."""
    ablation = scores.get("ablation") or {}
    lines = [f"{title}: {scores['n']} samples"]
    header = f"{'score':<28} {'value':>9}  {'95% CI':<19}"
    lines.append(header + ("  drop on ablated images (95% CI)" if ablation else ""))
    for name, m in scores["metrics"].items():
        line = f"{name:<28} {stats.fmt(m['value']):>9}  [{stats.fmt(m['low'])}, {stats.fmt(m['high'])}]"
        line = line.ljust(len(header))
        if name in ablation:
            d = ablation[name]
            line += f"  {stats.fmt(d['drop'])} [{stats.fmt(d['low'])}, {stats.fmt(d['high'])}]"
        lines.append(line)
    return "\n".join(lines)


# --- files -------------------------------------------------------------------------------------------------------
def _per_sample_rows(rows: list[dict], cols: dict) -> list[dict]:
    return [{"id": r.get("id", i), **{k: float(v[i]) for k, v in cols.items()}} for i, r in enumerate(rows)]


def load_per_sample(folder: str | Path) -> tuple[list[str], dict[str, np.ndarray]] | None:
    """(ids, columns) from an eval folder's per_sample.jsonl, or None when it has none."""
    path = Path(folder) / "per_sample.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return None
    keys = [k for k in rows[0] if k != "id"]
    return [str(r["id"]) for r in rows], {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(_json_safe(data), ensure_ascii=False, indent=2), encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _json_safe(value):
    # An undefined ratio (NaN) is written as null: NaN is not JSON and browsers' JSON.parse rejects it.
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
