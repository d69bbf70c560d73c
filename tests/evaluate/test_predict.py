"""`radscribe eval` / `score`: files in LLaMA-Factory's format, scores that match, ablations that expose a model."""

import dataclasses
import json
import math

import pytest

from radscribe.cli import main
from radscribe.data.dataset import read_split
from radscribe.data.synth import report
from radscribe.errors import RadscribeError
from radscribe.evaluate import metrics
from radscribe.evaluate.predict import EvalConfig, evaluate, output_dir

LF_KEYS = {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_runtime",
           "predict_samples_per_second", "predict_steps_per_second"}


def test_eval_with_tiny_model_writes_llamafactory_files(tiny_model_dir, small_dataset, tmp_path, capsys):
    out = tmp_path / "evals"
    code = main(["eval", "--model", str(tiny_model_dir("qwen3_vl")), "--data", str(small_dataset), "--limit", "5",
                 "--batch-size", "4", "--max-new-tokens", "8", "--dtype", "fp32", "--n-boot", "100", "--out", str(out)])
    assert code == 0
    folder = out / "val"
    rows = [json.loads(line) for line in (folder / "generated_predictions.jsonl").read_text().splitlines()]
    expected = list(read_split(small_dataset, "val"))[:5]
    assert [r["id"] for r in rows] == [s.id for s in expected]
    assert [r["label"] for r in rows] == [s.report for s in expected]
    assert all(list(r)[:3] == ["prompt", "predict", "label"] and r["image"] and r["truth"] for r in rows)
    results = json.loads((folder / "predict_results.json").read_text())
    assert set(results) == LF_KEYS
    assert results["predict_samples_per_second"] > 0
    rescored = metrics.aggregate(metrics.score_pairs([r["predict"] for r in rows], [r["label"] for r in rows]))
    for key, value in rescored.items():
        assert results[key] == pytest.approx(value, abs=1e-4)
    scores = json.loads((folder / "scores.json").read_text())
    assert scores["n"] == 5 and "truth_location_accuracy" in scores["metrics"]
    assert "truth_location_accuracy" in capsys.readouterr().out  # the score table is printed
    # `radscribe score` on the written file gives the same numbers
    assert main(["score", str(folder / "generated_predictions.jsonl"), "--n-boot", "50", "--out", str(tmp_path / "s")]) == 0
    again = json.loads((tmp_path / "s" / "predict_results.json").read_text())
    assert all(again[k] == pytest.approx(results[k], abs=1e-4) for k in rescored)


class OracleEngine:
    """Reads the image perfectly: returns the true report of the exact image it is shown, else a normal report."""

    def __init__(self, dataset):
        from PIL import Image

        self.known = {}
        for split in ("train", "val"):
            for s in read_split(dataset, split):
                self.known[Image.open(s.images[0]).convert("RGB").tobytes()] = report(s.truth)

    def generate(self, requests, batch_size=None):
        answers = []
        for r in requests:
            image = next(p["image"] for p in r.messages[0]["content"] if p["type"] == "image")
            answers.append(self.known.get(image.tobytes(), "这是一张图像，未见异常。"))
        return answers


class BlindEngine:
    """Ignores the image: always the same plausible report."""

    def generate(self, requests, batch_size=None):
        return ["这是一张脑部CT图像，左上可见一个小的高密度结节。"] * len(requests)


@pytest.mark.parametrize("ablate", ["blank", "shuffle"])
def test_ablation_exposes_a_model_that_reads_the_image(small_dataset, tmp_path, ablate):
    cfg = EvalConfig(model="unused", data=str(small_dataset), out=str(tmp_path / "o"), ablate=ablate, n_boot=200)
    scores = evaluate(cfg, engine=OracleEngine(small_dataset))
    real = json.loads((tmp_path / "o" / "val" / "scores.json").read_text())  # the real-image eval ran first
    assert real["metrics"]["truth_all_accuracy"]["value"] == 100.0
    drop = json.loads((output_dir(cfg) / "ablation.json").read_text())
    assert drop.keys() == scores["ablation"].keys()
    assert drop["truth_all_accuracy"]["real"] == 100.0
    assert drop["truth_all_accuracy"]["drop"] > 50 and drop["truth_all_accuracy"]["low"] > 0
    assert drop["rouge-l"]["drop"] > 0 and drop["rouge-l"]["real"] == 100.0


def test_ablation_shows_no_drop_for_a_blind_model(small_dataset, tmp_path):
    cfg = EvalConfig(model="unused", data=str(small_dataset), out=str(tmp_path / "o"), ablate="blank", n_boot=200)
    scores = evaluate(cfg, engine=BlindEngine())
    defined = {name: d for name, d in scores["ablation"].items() if not math.isnan(d["real"])}
    # the blind model states a location and a finding, so these are defined on real images
    assert {"bleu-4", "rouge-l", "location_f1", "finding_f1", "truth_all_accuracy"} <= set(defined)
    assert all(d["drop"] == 0 and d["real"] == d["ablated"] for d in defined.values())
    undefined = set(scores["ablation"]) - set(defined)
    assert all(math.isnan(scores["ablation"][name]["ablated"]) for name in undefined)


def test_base_model_eval_needs_out(small_dataset):
    with pytest.raises(RadscribeError, match="needs --out"):
        output_dir(EvalConfig(model="m", data=str(small_dataset)))


def test_eval_with_adapter_writes_into_the_run_folder(tiny_model_dir, small_dataset, tmp_path):
    from peft import LoraConfig, get_peft_model

    from radscribe.model.load import load_model

    base_dir = tiny_model_dir("qwen3_vl")
    model, processor = load_model(base_dir, dtype="fp32", device="cpu")
    # Random (not zero) B matrices, so the adapter really changes what the model says.
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    run = tmp_path / "run"
    lora.save_pretrained(run / "adapter")
    args = ["--model", str(base_dir), "--data", str(small_dataset), "--limit", "3", "--max-new-tokens", "8",
            "--dtype", "fp32", "--n-boot", "20"]
    assert main(["eval", *args, "--adapter", str(run)]) == 0
    assert main(["eval", *args, "--out", str(tmp_path / "base")]) == 0
    tuned = [json.loads(l)["predict"] for l in (run / "eval" / "val" / "generated_predictions.jsonl").open()]
    base = [json.loads(l)["predict"] for l in (tmp_path / "base" / "val" / "generated_predictions.jsonl").open()]
    assert len(tuned) == len(base) == 3 and tuned != base


class FlakyEngine:
    """Numbers its answers; raises on its `fail_at`-th call (an interrupted eval)."""

    def __init__(self, fail_at=None):
        self.calls, self.seen, self.fail_at = 0, 0, fail_at

    def generate(self, requests, batch_size=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        self.seen += len(requests)
        return [f"answer {self.seen - len(requests) + i}" for i in range(len(requests))]


def test_interrupted_eval_resumes(small_dataset, tmp_path):
    cfg = EvalConfig(model="m", data=str(small_dataset), out=str(tmp_path), batch_size=3, n_boot=20)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, engine=FlakyEngine(fail_at=3))  # 2 batches (6 samples) done, then interrupted
    assert (tmp_path / "val" / "generated_predictions.partial.jsonl").is_file()
    resumed = FlakyEngine()
    evaluate(cfg, engine=resumed)
    assert resumed.seen == 2  # only the last 2 of 8 samples were generated again
    rows = [json.loads(l) for l in (tmp_path / "val" / "generated_predictions.jsonl").open()]
    assert [r["id"] for r in rows] == [s.id for s in read_split(small_dataset, "val")]
    assert [r["predict"] for r in rows] == [f"answer {i}" for i in range(6)] + ["answer 0", "answer 1"]
    assert not (tmp_path / "val" / "generated_predictions.partial.jsonl").exists()
    results = json.loads((tmp_path / "val" / "predict_results.json").read_text())
    assert results["predict_steps_per_second"] > 0
    # predictions saved under other settings are never reused
    with pytest.raises(KeyboardInterrupt):
        evaluate(dataclasses.replace(cfg, overwrite=True), engine=FlakyEngine(fail_at=2))
    fresh = FlakyEngine()
    evaluate(dataclasses.replace(cfg, max_new_tokens=7, overwrite=True), engine=fresh)
    assert fresh.seen == 8


def _eval_args(model, dataset, *extra):
    return ["eval", "--model", str(model), "--data", str(dataset), "--n-boot", "20", *extra]


def test_rerun_with_other_settings_refuses_to_replace_results(small_dataset, tmp_path, monkeypatch, capsys):
    import radscribe.serve.engine

    engine = FlakyEngine()
    monkeypatch.setattr(radscribe.serve.engine.Engine, "from_pretrained", lambda *a, **k: engine)
    model = tmp_path / "model"
    model.mkdir()
    out = tmp_path / "evals"
    assert main(_eval_args(model, small_dataset, "--out", str(out))) == 0
    before = (out / "val" / "generated_predictions.jsonl").read_text()
    assert len(before.splitlines()) == 8
    # `--limit 4` into the folder of an 8-sample eval: refused in one line, and nothing is touched
    capsys.readouterr()
    assert main(_eval_args(model, small_dataset, "--out", str(out), "--limit", "4")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"radscribe eval: error: {out / 'val'} already holds an eval of 8 samples made with other settings "
                   "(limit None -> 4; the evaluated samples); pass --overwrite to replace it, or --out DIR to keep "
                   "both")
    assert (out / "val" / "generated_predictions.jsonl").read_text() == before and engine.seen == 8
    # the same settings again: the saved results are reused, nothing is generated
    assert main(_eval_args(model, small_dataset, "--out", str(out))) == 0
    assert engine.seen == 8 and "already evaluated with these settings" in capsys.readouterr().out
    # a changed model folder counts as other settings, even at the same path
    (model / "model.safetensors").write_bytes(b"retrained")
    assert main(_eval_args(model, small_dataset, "--out", str(out))) == 2
    assert "the model files changed" in capsys.readouterr().err
    assert main(_eval_args(model, small_dataset, "--out", str(out), "--limit", "4", "--overwrite")) == 0
    assert len((out / "val" / "generated_predictions.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "val" / "scores.json").read_text())["settings"]["limit"] == 4


@pytest.mark.parametrize("change", [{"max_new_tokens": 64}, {"temperature": 0.7}, {"adapter": "other"}])
def test_ablation_reuses_the_real_eval_only_under_the_same_settings(small_dataset, tmp_path, change):
    runs = {}
    for name in ("run", "other"):
        runs[name] = tmp_path / name
        (runs[name] / "adapter").mkdir(parents=True)
        (runs[name] / "adapter" / "adapter_config.json").write_text(json.dumps({"name": name}))
    out = str(tmp_path / "o")
    cfg = EvalConfig(model="unused", data=str(small_dataset), adapter=str(runs["run"]), out=out, n_boot=50)
    evaluate(cfg, engine=OracleEngine(small_dataset))
    ablated = dataclasses.replace(cfg, ablate="blank")
    reused = FlakyEngine()
    evaluate(ablated, engine=reused)
    assert reused.seen == 8  # only the blanked images: the real-image eval was reused

    other = dataclasses.replace(ablated, ablate="shuffle",
                                **{k: str(runs[v]) if k == "adapter" else v for k, v in change.items()})
    refused = FlakyEngine()
    with pytest.raises(RadscribeError, match=r"the ablation is compared with real images under the same settings: "
                                             r".* made with other settings \((max_new_tokens|temperature|adapter) "):
        evaluate(other, engine=refused)
    assert refused.seen == 0
    redone = FlakyEngine()
    scores = evaluate(dataclasses.replace(other, overwrite=True), engine=redone)
    assert redone.seen == 16  # the real-image eval under the new settings, then the shuffled one
    real = json.loads((tmp_path / "o" / "val" / "scores.json").read_text())
    assert real["settings"] == {**scores["settings"], "ablate": None}
    assert all(real["settings"][k] == (str((runs["other"] / "adapter").resolve()) if k == "adapter" else v)
               for k, v in change.items())


def test_eval_on_an_interrupted_run_names_its_checkpoints(small_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    for step in (5, 10):
        (run / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-10" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("output:\n  dir: run\n")
    assert main(_eval_args(tmp_path / "model", small_dataset, "--adapter", str(run))) == 2
    assert capsys.readouterr().err.strip() == (
        f"radscribe eval: error: {run} has no adapter/: its training did not finish (checkpoints: checkpoint-5, "
        f"checkpoint-10); continue it with `radscribe train --config {run / 'config.yaml'} --resume`, or pass "
        f"--adapter {run / 'checkpoints' / 'checkpoint-10'} to use its last checkpoint as it is")
