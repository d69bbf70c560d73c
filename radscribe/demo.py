"""The whole pipeline on the embedded default, in minutes on a 2-core CPU: a general model becomes a specialist.

Run as: radscribe demo [--out runs/demo] [--lang zh|en] [--fresh] [section.field=value ...]

Stages (each cached in OUT/; a rerun reuses finished stages whose settings did not change, `--fresh` redoes all):
  1. data     synthesise MedTrinity-shaped parquet (phantoms with ground truth) and `prepare` it, split by patient
  2. base     a tiny Qwen3-VL (the real class, tokenizer trained on the report vocabulary), then a short
              full-parameter "pre-training" on generic captions (modality and organ only) plus text-only report
              sentences; it stands in for a general pretrained VLM that knows the words but not the findings
  3. eval     the base on the held-out split
  4. lora     LoRA fine-tuning on the full reports (the recommended recipe's shape: rank 32, alpha 2x rank,
              cosine with warmup; steps and learning rate scaled for a tiny model on a CPU)
  5. eval     the fine-tuned model on the same held-out split
  6. report   HTML + Markdown report; the before/after table is printed

Why the base stage mixes in text-only report sentences: a LoRA cannot lift the logits of output rows that never
trained, so the "general" model must have seen the report vocabulary (without these rows the position accuracy
stayed at chance, even with lm_head trainable). Those rows carry no image, so they teach no image-to-finding
mapping. Why the LoRA also covers the vision tower: the lesion's
position reaches the language model only through the tower's features, and a tower trained on modality/organ alone
encodes lesions weakly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from math import inf
from pathlib import Path
from typing import Literal

from radscribe.config import load_config, save_config
from radscribe.errors import RadscribeError
from radscribe.evaluate.stats import finite, fmt_ci


@dataclass
class DataArgs:
    n: int = 1200
    """Synthetic images (about 1,000 train and 200 held out)."""
    size: int = 96
    """Image side in pixels (96 px = 9 image tokens per image after the 2x2 merge)."""
    val_ratio: float = 0.17
    """Share of patients held out."""
    slices_per_patient: int = 2
    """Slices per patient; the split keeps a patient's slices together."""
    seed: int = 0
    """Seed of the synthetic data."""


@dataclass
class ModelArgs:
    text_hidden: int = 128
    """Hidden size of the tiny language model."""
    text_layers: int = 2
    """Decoder layers."""
    vision_hidden: int = 64
    """Hidden size of the tiny vision tower."""
    vision_depth: int = 2
    """Vision blocks."""
    vocab_size: int = 800
    """BPE vocabulary target for the tokenizer trained on the reports."""
    seed: int = 0
    """Initialisation seed."""


@dataclass
class StageArgs:
    steps: int = 200
    """Optimizer steps."""
    batch: int = 32
    """Samples per step."""
    lr: float = 1e-3
    """Peak learning rate."""


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    """Demo folder: every stage's output lives under it."""
    lang: Literal["zh", "en"] = "zh"
    """Report and prompt language."""
    threads: int = 2
    """torch threads (this machine has 2 cores)."""
    data: DataArgs = field(default_factory=DataArgs)
    """The synthetic dataset."""
    model: ModelArgs = field(default_factory=ModelArgs)
    """The tiny base model."""
    pretrain: StageArgs = field(default_factory=StageArgs)
    """Stage 1: full-parameter training on generic captions."""
    finetune: StageArgs = field(default_factory=lambda: StageArgs(steps=600, batch=32, lr=2e-3))
    """Stage 2: LoRA on the full reports."""
    lora_rank: int = 32
    """LoRA rank (alpha = 2 x rank, the recommended recipe)."""
    eval_batch: int = 16
    """Generation batch size."""
    max_new_tokens: int = 96
    """Generation budget (a synthetic report is about 20-40 tokens with the report-trained tokenizer)."""
    eval_limit: int | None = None
    """Evaluate only the first N held-out samples (quick runs)."""


def demo(cfg: DemoConfig, fresh: bool = False) -> dict:
    """Run (or reuse) every stage and return the before/after numbers."""
    import torch

    if cfg.data.n < 20:
        raise RadscribeError(f"data.n={cfg.data.n}: the demo needs at least 20 images to hold some out")
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo_config.yaml")
    started = time.perf_counter()
    stages = _Stages(out, cfg)

    dataset = stages.run("1/6 data", _data_stage, depends=("data", "lang"))
    base_model = stages.run("2/6 base model", _base_stage, dataset, depends=("data", "lang", "model", "pretrain"))
    base_eval = stages.run("3/6 evaluate base", _eval_stage, base_model, dataset, None, out / "base",
                           depends=("data", "lang", "model", "pretrain", "eval_batch", "max_new_tokens",
                                    "eval_limit"))
    lora_run = stages.run("4/6 LoRA fine-tune", _lora_stage, base_model, dataset,
                          depends=("data", "lang", "model", "pretrain", "finetune", "lora_rank"))
    tuned_eval = stages.run("5/6 evaluate fine-tuned", _eval_stage, base_model, dataset, lora_run, lora_run,
                            depends=("data", "lang", "model", "pretrain", "finetune", "lora_rank", "eval_batch",
                                     "max_new_tokens", "eval_limit"))
    _say("6/6 report")
    from radscribe.evaluate.report import report

    html = report([str(out / "base"), str(lora_run)], out=str(out / "report"))
    table = before_after(base_eval, tuned_eval)
    elapsed = time.perf_counter() - started
    print(table)
    print(f"\nreport: {html}\ndemo finished in {elapsed:.0f} s")
    result = {"base": _headline(base_eval), "fine_tuned": _headline(tuned_eval), "report": str(html),
              "seconds": round(elapsed, 1), "improved": improved(base_eval, tuned_eval)}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


# --- stages ------------------------------------------------------------------------------------------------------
def _data_stage(cfg: DemoConfig, out: Path) -> Path:
    from radscribe.data.prepare import PrepareConfig, prepare
    from radscribe.data.synth import SynthConfig, synth

    d = cfg.data
    synth(SynthConfig(out=str(out / "synth"), n=d.n, seed=d.seed, lang=cfg.lang, size=d.size,
                      slices_per_patient=d.slices_per_patient, shard_rows=max(1, d.n // 2)))
    dataset = out / "dataset"
    prepare(PrepareConfig(inputs=[str(out / "synth")], out=str(dataset), group_by="patient",
                          val_ratio=d.val_ratio, lang=cfg.lang, seed=d.seed))
    return dataset


def _base_stage(cfg: DemoConfig, out: Path, dataset: Path) -> Path:
    from radscribe.model.tiny import build_tiny_model, dataset_corpus

    general = write_general_dataset(dataset, out / "general", cfg.lang)
    m = cfg.model
    tiny = build_tiny_model("qwen3_vl", out / "tiny", seed=m.seed, text_hidden=m.text_hidden,
                            text_layers=m.text_layers, vision_hidden=m.vision_hidden, vision_depth=m.vision_depth,
                            corpus=dataset_corpus(dataset) + dataset_corpus(general), vocab_size=m.vocab_size)
    p = cfg.pretrain
    run = _train(tiny, general, out / "base", [
        "lora.enabled=false", f"train.max_steps={p.steps}", f"train.per_device_batch={p.batch}",
        f"train.lr={p.lr}", "train.warmup_ratio=0.05", "train.scheduler=cosine",
    ])
    return run / "model"


def _lora_stage(cfg: DemoConfig, out: Path, base_model: Path, dataset: Path) -> Path:
    f = cfg.finetune
    return _train(base_model, dataset, out / "lora", [
        f"lora.rank={cfg.lora_rank}", f"lora.alpha={2 * cfg.lora_rank}", "lora.vision_tower=true",
        f"train.max_steps={f.steps}", f"train.per_device_batch={f.batch}", f"train.lr={f.lr}",
    ])


def _train(model: Path, dataset: Path, run: Path, overrides: list[str]) -> Path:
    from radscribe.train import TrainConfig, train

    if run.exists():
        shutil.rmtree(run)  # a stage that did not finish leaves no reusable state
    cfg = load_config(TrainConfig, "recommended", [
        f"model.path={model}", f"data.dataset={dataset}", f"output.dir={run}",
        "train.grad_accum=1", "train.precision=fp32", "train.logging_steps=10", "train.save_steps=100000",
        # a tiny model on a CPU has memory to spare: recomputing activations would only slow the demo down
        "train.eval_steps=null", "data.cutoff_len=512", "train.gradient_checkpointing=false", *overrides,
    ])
    return train(cfg)


def _eval_stage(cfg: DemoConfig, out: Path, model: Path, dataset: Path, adapter: Path | None, run: Path) -> dict:
    from radscribe.evaluate.predict import EvalConfig, evaluate

    # overwrite: the stage cache owns this folder and reruns the stage exactly when its settings changed
    return evaluate(EvalConfig(model=str(model), data=str(dataset), adapter=str(adapter) if adapter else None,
                               out=str(run / "eval"), batch_size=cfg.eval_batch, max_new_tokens=cfg.max_new_tokens,
                               limit=cfg.eval_limit, dtype="fp32", overwrite=True))


def write_general_dataset(dataset: Path, out: Path, lang: str) -> Path:
    """Stage 1's data: each image with a generic caption (modality and organ only), plus text-only report rows.

    Image paths point into the prepared dataset (relative to `out`), so no image is copied.
    """
    from radscribe.data.dataset import read_split
    from radscribe.data.synth import VOCAB

    out.mkdir(parents=True, exist_ok=True)
    prompt = {"zh": "<image>这是什么图像?", "en": "<image>What kind of image is this?"}[lang]
    text_prompt = {"zh": "写一份放射学报告。", "en": "Write a radiology report."}[lang]
    rel = os.path.relpath(dataset, out)
    for split in ("train", "val"):
        rows = []
        for s in read_split(dataset, split):
            t = s.truth
            modality, organ = VOCAB["modality"][t["modality"]][lang], VOCAB["organ"][t["organ"]][lang]
            caption = (f"这是一张{organ}{modality}图像。" if lang == "zh"
                       else f"This is a {modality} image of the {organ}.")
            images = [os.path.join(rel, p.relative_to(dataset)) for p in s.images]
            rows.append({"id": f"{s.id}-caption", "images": images,
                         "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}]})
            if split == "train":
                rows.append({"id": f"{s.id}-text", "images": [],
                             "messages": [{"role": "user", "content": text_prompt},
                                          {"role": "assistant", "content": s.report}]})
        (out / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return out


# --- results -----------------------------------------------------------------------------------------------------
HEADLINE = ("rouge-l", "bleu-4", "finding_f1", "location_f1", "truth_all_accuracy")


def _headline(scores: dict) -> dict:
    return {k: scores["metrics"][k] for k in HEADLINE if k in scores["metrics"]}


def improved(base: dict, tuned: dict) -> bool:
    """The demo's claim: ROUGE-L and finding F1 both higher, with non-overlapping 95 % CIs."""
    ok = True
    for key in ("rouge-l", "finding_f1"):
        b, t = base["metrics"].get(key), tuned["metrics"].get(key)
        ok = ok and b is not None and t is not None and finite(t["low"], -inf) > finite(b["high"], -inf)
    return ok


def before_after(base: dict, tuned: dict) -> str:
    lines = [f"\n{'score':<22} {'base':>22} {'fine-tuned':>22}"]
    for key in HEADLINE:
        if key in base["metrics"] or key in tuned["metrics"]:
            lines.append(f"{key:<22} {fmt_ci(base['metrics'].get(key), '.1f'):>22} "
                         f"{fmt_ci(tuned['metrics'].get(key), '.1f'):>22}")
    lines.append(f"{'samples/s':<22} {base['predict_results']['predict_samples_per_second']:>22} "
                 f"{tuned['predict_results']['predict_samples_per_second']:>22}")
    verdict = "yes" if improved(base, tuned) else "NO"
    lines.append(f"fine-tuned beats base on ROUGE-L and finding F1 with non-overlapping 95 % CIs: {verdict}")
    return "\n".join(lines)


# --- stage cache -------------------------------------------------------------------------------------------------
class _Stages:
    """Runs a stage unless OUT/.stages/<name>.json records the same settings; stores the stage's result there."""

    def __init__(self, out: Path, cfg: DemoConfig):
        self.out, self.cfg, self.dir = out, cfg, out / ".stages"
        self.dir.mkdir(exist_ok=True)

    def run(self, name: str, fn, *args, depends: tuple[str, ...]):
        settings = {k: asdict(self.cfg).get(k) for k in depends}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        marker = self.dir / f"{name.split()[0].replace('/', '-')}-{fn.__name__}.json"
        if marker.is_file():
            done = json.loads(marker.read_text(encoding="utf-8"))
            if done.get("key") == key:
                _say(f"{name}: cached ({marker.name}); --fresh to redo")
                return _decode(done["result"])
        _say(name)
        t0 = time.perf_counter()
        result = fn(self.cfg, self.out, *args)
        marker.write_text(json.dumps({"key": key, "result": _encode(result),
                                      "seconds": round(time.perf_counter() - t0, 1)}, ensure_ascii=False),
                          encoding="utf-8")
        _say(f"{name}: done in {time.perf_counter() - t0:.0f} s")
        return result


def _encode(result):
    return {"path": str(result)} if isinstance(result, Path) else result


def _decode(result):
    return Path(result["path"]) if isinstance(result, dict) and set(result) == {"path"} else result


def _say(message: str) -> None:
    print(f"[radscribe demo] {message}", file=sys.stderr, flush=True)
