"""`radscribe report`: one self-contained HTML page (and a Markdown twin) about one or more runs.

Run as: radscribe report RUN_OR_EVAL_DIR... [--out DIR] [--samples 6]

Each argument is a run folder (its evaluations are RUN/eval/<split>[-<ablation>]/), an eval root written with
`radscribe eval --out DIR`, or one eval folder. The FIRST argument is the baseline: every other one is compared with
it split by split (before/after when the first is the base model's eval, run vs run e.g. Z2 vs Z3 otherwise), as
paired bootstrap differences on the samples both evaluated.
The page holds: the metrics table with 95 % CIs, a metrics chart, the comparisons, image-grounding ablations, loss
curves (RUN/log.jsonl), each run's config, and sample images with the reference and every run's report side by side.
Images and plots are embedded as data URIs, so the HTML file can be mailed or archived alone; the Markdown refers
to PNG files written next to it. Default output: FIRST/report/.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from radscribe.errors import RadscribeError
from radscribe.evaluate import stats
from radscribe.evaluate.metrics import read_predictions
from radscribe.evaluate.predict import load_per_sample, statistics_for
from radscribe.runlog import read_log

HEADLINE = ("bleu-4", "rouge-l", "location_f1", "finding_f1", "hallucination_rate", "truth_location_accuracy",
            "truth_finding_accuracy", "truth_all_accuracy")
"""Scores shown in the summary table and chart (when present); the full list follows per run."""


@dataclass
class EvalResult:
    run: str
    """Label of the run (folder name)."""
    name: str
    """Eval folder name: <split>[-<ablation>]."""
    folder: Path
    scores: dict
    predictions: list[dict] = field(default_factory=list)


@dataclass
class RunInfo:
    label: str
    path: Path
    evals: list[EvalResult]
    config: str | None = None
    log: list[dict] = field(default_factory=list)


def report(paths: list[str], out: str | None = None, n_samples: int = 6, n_boot: int = 1000, seed: int = 0) -> Path:
    """Write DIR/report.html and DIR/report.md; returns the HTML path."""
    runs = [_read_run(Path(p)) for p in paths]
    out_dir = Path(out) if out else runs[0].path / "report"
    out_dir.mkdir(parents=True, exist_ok=True)

    figures = {"metrics": _metrics_chart(runs)}
    if any(r.log for r in runs):
        figures["loss"] = _loss_chart(runs)
    comparisons = _comparisons(runs, n_boot, seed)
    samples = _samples(runs, n_samples)

    for name, png in figures.items():
        (out_dir / f"{name}.png").write_bytes(png)
    for i, s in enumerate(samples):
        if s["png"] is not None:
            (out_dir / f"sample-{i}.png").write_bytes(s["png"])
    missing = [s["missing"] for s in samples if s["missing"]]
    if missing:
        print(f"report: {len(missing)} sample image(s) no longer readable, shown without the image: "
              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}", file=sys.stderr)
    html_path = out_dir / "report.html"
    html_path.write_text(_html(runs, figures, comparisons, samples), encoding="utf-8")
    (out_dir / "report.md").write_text(_markdown(runs, figures, comparisons, samples), encoding="utf-8")
    print(f"report: {html_path} and {out_dir / 'report.md'}")
    return html_path


# --- reading -----------------------------------------------------------------------------------------------------
def _read_run(path: Path) -> RunInfo:
    if not path.is_dir():
        raise RadscribeError(f"{path} is not a folder (pass a run folder or an eval output folder)")
    if (path / "scores.json").is_file():
        folders = [path]
    else:
        root = path / "eval" if (path / "eval").is_dir() else path
        folders = sorted(p.parent for p in root.glob("*/scores.json"))
    if not folders:
        raise RadscribeError(f"{path} holds no evaluation (no scores.json in it, in eval/*/ or in */); "
                             f"run `radscribe eval` first")
    label = path.name if path.name not in ("eval", "val", "train") else f"{path.parent.name}/{path.name}"
    evals = []
    for folder in folders:
        scores = json.loads((folder / "scores.json").read_text(encoding="utf-8"))
        predictions_file = folder / "generated_predictions.jsonl"
        predictions = read_predictions(predictions_file) if predictions_file.is_file() else []
        evals.append(EvalResult(label, folder.name, folder, scores, predictions))
    config = (path / "config.yaml").read_text(encoding="utf-8") if (path / "config.yaml").is_file() else None
    return RunInfo(label, path, evals, config, read_log(path))


def _comparisons(runs: list[RunInfo], n_boot: int, seed: int) -> list[dict]:
    """Baseline (first run) vs each other run, per eval folder name, on the samples both evaluated."""
    out = []
    base = runs[0]
    for other in runs[1:]:
        for b in base.evals:
            o = next((e for e in other.evals if e.name == b.name), None)
            loaded_b, loaded_o = load_per_sample(b.folder), load_per_sample(o.folder) if o else None
            if o is None or loaded_b is None or loaded_o is None:
                continue
            (ids_b, cols_b), (ids_o, cols_o) = loaded_b, loaded_o
            common = [i for i in ids_b if i in set(ids_o)]
            if not common:
                continue
            pos_b, pos_o = {i: k for k, i in enumerate(ids_b)}, {i: k for k, i in enumerate(ids_o)}
            take_b, take_o = [pos_b[i] for i in common], [pos_o[i] for i in common]
            cols_b = {k: v[take_b] for k, v in cols_b.items()}
            cols_o = {k: v[take_o] for k, v in cols_o.items() if k in cols_b}
            statistics = statistics_for(cols_b)
            out.append({"a": base.label, "b": other.label, "eval": b.name, "n": len(common),
                        "diff": stats.paired(cols_b, cols_o, statistics, n_boot=n_boot, seed=seed)})
    return out


def _samples(runs: list[RunInfo], n: int) -> list[dict]:
    """The first `n` samples of the baseline's main eval, with every run's report for the same id.

    A sample whose image cannot be read any more (moved or deleted since the eval) is shown without it, with the
    path it had, so the page still holds the same samples and says which image is missing.
    """
    main_eval = next((e for e in runs[0].evals if "-" not in e.name), runs[0].evals[0])
    out = []
    for row in main_eval.predictions[:n]:
        images = row.get("image") or []
        images = [images] if isinstance(images, str) else images
        png = _thumbnail(Path(images[0])) if images else None
        missing = images[0] if images and png is None else None
        predicted = []
        for run in runs:
            e = next((x for x in run.evals if x.name == main_eval.name), None)
            match = next((p for p in (e.predictions if e else []) if p.get("id") == row.get("id")), None)
            if match is not None:
                predicted.append((run.label, match["predict"]))
        out.append({"id": row.get("id"), "label": row["label"], "predicted": predicted, "png": png,
                    "missing": missing, "truth": row.get("truth")})
    return out


def _thumbnail(path: Path) -> bytes | None:
    from radscribe.serve.engine import load_request_image

    try:
        image = load_request_image(path)
    except (RadscribeError, OSError):
        return None  # moved or deleted since the eval: the caller shows the sample without it
    image.thumbnail((256, 256))
    if min(image.size) < 160:  # tiny phantoms: enlarge so they are visible on the page
        scale = 160 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), 0)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- figures -----------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _loss_chart(runs: list[RunInfo]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for run in runs:
        train = [(r["step"], r["loss"]) for r in run.log if "loss" in r and "step" in r]
        evals = [(r["step"], r["eval_loss"]) for r in run.log if "eval_loss" in r and "step" in r]
        if train:
            ax.plot(*zip(*train), label=f"{run.label} train")
        if evals:
            ax.plot(*zip(*evals), "o--", label=f"{run.label} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _metrics_chart(runs: list[RunInfo]) -> bytes:
    plt = _pyplot()
    entries = [(f"{r.label} · {e.name}", e.scores["metrics"]) for r in runs for e in r.evals]
    names = [n for n in HEADLINE if any(n in m for _, m in entries)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 3.8))
    width = 0.8 / max(1, len(entries))
    for k, (label, m) in enumerate(entries):
        values = [stats.finite(m.get(n, {}).get("value"), 0.0) for n in names]
        low = [v - stats.finite(m.get(n, {}).get("low"), v) for n, v in zip(names, values)]
        high = [stats.finite(m.get(n, {}).get("high"), v) - v for n, v in zip(names, values)]
        ax.bar(np.arange(len(names)) + k * width, values, width, yerr=[low, high], capsize=2, label=label)
    ax.set_xticks(np.arange(len(names)) + width * (len(entries) - 1) / 2)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("score (%) with 95% CI")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


# --- writing -----------------------------------------------------------------------------------------------------
def _summary_rows(runs):
    entries = [(r.label, e) for r in runs for e in r.evals]
    names = [n for n in HEADLINE if any(n in e.scores["metrics"] for _, e in entries)]
    rows = [[label, e.name, str(e.scores["n"])] + [stats.fmt_ci(e.scores["metrics"][n]) if n in e.scores["metrics"] else "–"
                                                   for n in names] for label, e in entries]
    return ["run", "eval", "n", *names], rows


def _comparison_rows(c: dict):
    return [[name, stats.fmt(d["a"]), stats.fmt(d["b"]), stats.fmt(d["diff"], "+.2f"),
             f"[{stats.fmt(d['low'])}, {stats.fmt(d['high'])}]",
             "yes" if stats.finite(d["low"], 0) > 0 or stats.finite(d["high"], 0) < 0 else "no"]
            for name, d in c["diff"].items()]


COMPARISON_HEADER = ["score", "A", "B", "B − A", "95% CI", "CI excludes 0"]


def _ablation_rows(e: EvalResult):
    ablation = json.loads((e.folder / "ablation.json").read_text(encoding="utf-8"))
    return [[name, stats.fmt(d["real"]), stats.fmt(d["ablated"]), stats.fmt(d["drop"]),
             f"[{stats.fmt(d['low'])}, {stats.fmt(d['high'])}]"]
            for name, d in ablation.items()]


ABLATION_HEADER = ["score", "real images", "ablated", "drop", "95% CI of the drop"]


def _html_table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 20px;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:left}th{background:#f0f3f7}img.plot{max-width:100%;border:1px solid #ddd}
.sample{display:flex;gap:16px;border-top:1px solid #ddd;padding:12px 0}.sample img{width:200px;height:auto;
image-rendering:pixelated;border:1px solid #999}.missing{width:200px;height:120px;border:1px dashed #999;
color:#666;font-size:12px;padding:6px;overflow-wrap:anywhere}.texts{flex:1;display:grid;gap:6px}.ref{background:#eef7ee}
.gen{background:#f7f3ea}.texts div{padding:6px;border-radius:4px;white-space:pre-wrap}pre{background:#f6f6f6;
padding:8px;font-size:12px;overflow:auto}"""

# Records how many embedded images the browser decoded, so a headless check can read it from the DOM.
SELF_CHECK = """<script>window.addEventListener('load',function(){var im=[].slice.call(document.images);
document.body.setAttribute('data-images-decoded',im.filter(function(i){return i.complete&&i.naturalWidth>0}).length+
'/'+im.length);});</script>"""


def _html(runs, figures, comparisons, samples) -> str:
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>radscribe report</title>",
         f"<style>{STYLE}</style></head><body>", "<h1>radscribe report</h1>",
         "<p>Runs: " + ", ".join(html.escape(r.label) for r in runs) + " (the first is the baseline of every "
         "comparison). Scores in percent with bootstrap 95 % confidence intervals.</p>",
         "<h2>Metrics</h2>", _html_table(*_summary_rows(runs)),
         f"<img class='plot' alt='metrics chart' src='{_data_uri(figures['metrics'])}'>"]
    if "loss" in figures:
        h.append(f"<h2>Loss curves</h2><img class='plot' alt='loss curves' src='{_data_uri(figures['loss'])}'>")
    h.append("<h2>Samples</h2>")
    for s in samples:
        texts = [f"<div class='ref'><b>reference</b>\n{html.escape(s['label'])}</div>"]
        texts += [f"<div class='gen'><b>{html.escape(label)}</b>\n{html.escape(text)}</div>"
                  for label, text in s["predicted"]]
        picture = (f"<img alt='sample {html.escape(str(s['id']))}' src='{_data_uri(s['png'])}'>" if s["png"] else
                   f"<div class='missing'>{html.escape(_no_picture(s))}</div>")
        h.append(f"<div class='sample'><figure>{picture}<figcaption>{html.escape(str(s['id']))}</figcaption>"
                 f"</figure><div class='texts'>{''.join(texts)}</div></div>")
    if comparisons:
        h.append("<h2>Comparisons (paired bootstrap)</h2>")
        for c in comparisons:
            h.append(f"<h3>{html.escape(c['a'])} (A) → {html.escape(c['b'])} (B) · {html.escape(c['eval'])} · "
                     f"{c['n']} paired samples</h3>")
            h.append(_html_table(COMPARISON_HEADER, _comparison_rows(c)))
    ablations = [(r, e) for r in runs for e in r.evals if (e.folder / "ablation.json").is_file()]
    if ablations:
        h.append("<h2>Image-grounding checks</h2><p>A model that reads the image loses score when the images are "
                 "blanked or shuffled; no drop means the reports do not depend on the image.</p>")
        for r, e in ablations:
            h.append(f"<h3>{html.escape(r.label)} · {html.escape(e.name)}</h3>")
            h.append(_html_table(ABLATION_HEADER, _ablation_rows(e)))
    h.append("<h2>Details</h2>")
    for r in runs:
        for e in r.evals:
            h.append(f"<details><summary>{html.escape(r.label)} · {html.escape(e.name)}: all scores</summary>")
            h.append(_html_table(["score", "value [95% CI]"],
                                 [[n, stats.fmt_ci(m)] for n, m in e.scores["metrics"].items()]))
            if e.scores.get("predict_results"):
                h.append(f"<pre>{html.escape(json.dumps(e.scores['predict_results'], indent=1))}</pre>")
            if e.scores.get("config"):  # what was evaluated: model, adapter, split, generation settings
                h.append(f"<pre>{html.escape(yaml.safe_dump(e.scores['config'], sort_keys=False))}</pre>")
            h.append("</details>")
        if r.config:
            h.append(f"<details><summary>{html.escape(r.label)}: config.yaml</summary>"
                     f"<pre>{html.escape(r.config)}</pre></details>")
    h.append(SELF_CHECK + "</body></html>")
    return "\n".join(h)


def _no_picture(sample: dict) -> str:
    return f"image not found: {sample['missing']}" if sample["missing"] else "no image (text-only sample)"


def _md_table(header, rows) -> str:
    def cell(c):
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(runs, figures, comparisons, samples) -> str:
    md = ["# radscribe report", "",
          f"Runs: {', '.join(r.label for r in runs)} (the first is the baseline). Percent, bootstrap 95 % CIs.", "",
          "## Metrics", "", _md_table(*_summary_rows(runs)), "", "![metrics](metrics.png)", ""]
    for c in comparisons:
        md += [f"## {c['a']} (A) → {c['b']} (B) · {c['eval']} · {c['n']} paired samples", "",
               _md_table(COMPARISON_HEADER, _comparison_rows(c)), ""]
    for r in runs:
        for e in r.evals:
            if (e.folder / "ablation.json").is_file():
                md += [f"## Image-grounding check: {r.label} · {e.name}", "",
                       _md_table(ABLATION_HEADER, _ablation_rows(e)), ""]
    if "loss" in figures:
        md += ["## Loss curves", "", "![loss](loss.png)", ""]
    md += ["## Samples", ""]
    for i, s in enumerate(samples):
        picture = f"![{s['id']}](sample-{i}.png)" if s["png"] else f"*({_no_picture(s)})*"
        md += [f"### {s['id']}", "", picture, "", f"- **reference**: {s['label']}"]
        md += [f"- **{label}**: {text}" for label, text in s["predicted"]]
        md.append("")
    for r in runs:
        if r.config:
            md += [f"## Config: {r.label}", "", "```yaml", r.config.rstrip(), "```", ""]
    return "\n".join(md)
