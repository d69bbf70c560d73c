"""The `radscribe` command: parsing only. Each subcommand parses its flags and calls one stage function.

Run as: radscribe {synth,prepare,tiny-model,train,eval,score,audit,report,chat,serve,export,demo} --help

Stage modules are imported inside each handler so `radscribe --help` and the data commands start fast
(importing transformers' model classes alone takes 8-10 s on this machine).
"""

from __future__ import annotations

import argparse
import sys

from radscribe.errors import RadscribeError


def _overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="a preset name (see radscribe/presets) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="dotted config overrides")


# --- synth ---
def cmd_synth(sub) -> None:
    p = sub.add_parser("synth", help="write MedTrinity-shaped parquet shards of phantom images with reports")
    p.add_argument("--config", default=None, help="a YAML file of SynthConfig fields (flags override it)")
    p.add_argument("--out", help="output folder for the parquet shards (default data/synth)")
    p.add_argument("--n", type=int, help="number of images (default 1000)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--lang", choices=["zh", "en"], help="report language (default zh)")
    p.add_argument("--size", type=int, help="image side in pixels (default 224)")
    p.add_argument("--shard-rows", type=int, help="rows per parquet shard (default 1000)")
    p.add_argument("--format", choices=["jpeg", "png"], help="image encoding (default jpeg)")
    p.add_argument("--slices-per-patient", type=int, help="consecutive rows sharing one patient (default 1)")
    p.add_argument("--normal-fraction", type=float, help="fraction of patients with no lesion (default 0.15)")
    p.add_argument("--workers", type=int, help="processes (default: one per core when there are several shards)")

    def run(a):
        import dataclasses

        from radscribe.config import load_config
        from radscribe.data.synth import SynthConfig, synth

        cfg = load_config(SynthConfig, a.config)
        flags = {f.name: getattr(a, f.name) for f in dataclasses.fields(SynthConfig)
                 if getattr(a, f.name, None) is not None}
        cfg = dataclasses.replace(cfg, **flags)
        paths = synth(cfg)
        print(f"{cfg.out}: {cfg.n} rows in {len(paths)} parquet shard(s)")

    p.set_defaults(handler=run)


# --- prepare ---
def cmd_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="image/report data -> ShareGPT multimodal dataset (LLaMA-Factory-readable)")
    p.add_argument("inputs", nargs="*", help="parquet files, globs or folders (MedTrinity 25M_demo / 25M_full layout)")
    p.add_argument("--config", default=None, help="a YAML file of PrepareConfig fields (flags override it)")
    p.add_argument("--out", help="output dataset folder (default data/dataset)")
    p.add_argument("--images", help="images folder of the 25M_full layout, joined on file_name")
    p.add_argument("--val-ratio", type=float, help="validation fraction (default 0.1)")
    p.add_argument("--group-by", help="keep groups on one side: source, patient, or a regex on the file name")
    p.add_argument("--format", choices=["json", "jsonl"], help="train/val file format (default json)")
    p.add_argument("--lang", choices=["zh", "en"], help="language of the default prompt (default zh)")
    p.add_argument("--prompt", help="custom prompt (<image> is prepended when missing)")
    p.add_argument("--prompts-file", help="file of prompts, one per line, sampled per row")
    p.add_argument("--seed", type=int, help="seed of the prompt sampling (default 0)")
    p.add_argument("--max-pixels", type=int, help="reject images with more pixels (default 50,000,000)")
    p.add_argument("--verify", choices=["decode", "structure"],
                   help="check headers, end markers and PNG CRCs (structure, default) or also decode every JPEG")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace a dataset prepared in --out with other arguments (only radscribe's files)")
    p.add_argument("--workers", type=int, help="image-verification processes (default: one per core)")
    p.add_argument("--dicom", help="DICOM folder (with --reports); rows are de-identified")
    p.add_argument("--nifti", help="NIfTI folder (with --reports)")
    p.add_argument("--reports", help="reports CSV for --dicom/--nifti")
    p.add_argument("--window", help="display window: auto, multi, or a preset (brain, lung, ...)")
    p.add_argument("--slices", help="slices of a volume: middle, all, every:N")
    p.add_argument("--keep-ids", action="store_true", default=None, help="keep source ids (no PHI only)")
    p.add_argument("--allow-burned-in", action="store_true", default=None,
                   help="accept images flagged with burned-in annotation")
    p.add_argument("--id-key", help="reports CSV column to join on")
    p.add_argument("--key", help="pseudonymisation secret (else env RADSCRIBE_DEID_KEY or a key file)")

    def run(a):
        import dataclasses

        from radscribe.config import load_config
        from radscribe.data.prepare import PrepareConfig, prepare

        cfg = load_config(PrepareConfig, a.config)
        flags = {f.name: getattr(a, f.name) for f in dataclasses.fields(PrepareConfig)
                 if getattr(a, f.name, None) not in (None, [])}
        prepare(dataclasses.replace(cfg, **flags))

    p.set_defaults(handler=run)


# --- tiny-model / train ---
def cmd_tiny_model(sub) -> None:
    p = sub.add_parser("tiny-model", help="write a tiny randomly initialised Qwen-VL model folder (offline)")
    p.add_argument("out", metavar="OUT", help="folder to write (created; existing files are overwritten)")
    p.add_argument("--arch", default="qwen3_vl", choices=["qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl"])
    p.add_argument("--layout", default="ours", choices=["ours", "real"],
                   help="ours: a self-trained small vocabulary that learns in seconds (default); real: every file "
                        "as in the published download (Qwen's real vocabulary, template, processor, bf16 weights)")
    p.add_argument("--seed", type=int, default=0, help="weights seed; same arguments -> same files")
    p.add_argument("--text-hidden", type=int, help="language model hidden size (multiple of 16; default 64)")
    p.add_argument("--text-layers", type=int, help="language model layers (default 2; 4 with --layout real)")
    p.add_argument("--vision-hidden", type=int, help="vision tower hidden size (multiple of 16; default 32)")
    p.add_argument("--vision-depth", type=int, help="vision tower blocks (default 2)")
    p.add_argument("--experts", type=int, help="MoE only: experts per layer (default 4)")
    p.add_argument("--experts-per-token", type=int, help="MoE only: top-k (default 2)")
    ours = p.add_argument_group("--layout ours only")
    ours.add_argument("--vocab-size", type=int, help="BPE vocabulary target (default 1000; stops early on small corpora)")
    ours.add_argument("--min-pixels", type=int, help="processor: smaller images are upscaled to this (default 64²)")
    ours.add_argument("--max-pixels", type=int, help="processor: larger images are downscaled to this (default 768²)")
    ours.add_argument("--corpus-dataset", default=None, metavar="DIR",
                      help="train the tokenizer on this prepared dataset's prompts and reports (default: built-in)")
    real = p.add_argument_group("--layout real only")
    real.add_argument("--tiktoken", metavar="FILE",
                      help="Qwen's qwen.tiktoken (default: the one in the installed dashscope package)")

    def run(a):
        sizes = {name: getattr(a, name) for name in ("text_hidden", "text_layers", "vision_hidden", "vision_depth",
                                                     "experts", "experts_per_token")
                 if getattr(a, name) is not None}
        only_ours = {"--vocab-size": a.vocab_size, "--min-pixels": a.min_pixels, "--max-pixels": a.max_pixels,
                     "--corpus-dataset": a.corpus_dataset}
        if a.layout == "real":
            given = [flag for flag, value in only_ours.items() if value is not None]
            if given:
                raise RadscribeError(f"{', '.join(given)} cannot take effect with --layout real (the real layout has "
                                     "Qwen's own vocabulary and the published processor limits)")
            from radscribe.model.real_layout import Widths, build_real_layout_model

            out = build_real_layout_model(a.arch, a.out, a.seed, widths=Widths(**sizes), tiktoken=a.tiktoken)
        else:
            if a.tiktoken is not None:
                raise RadscribeError("--tiktoken only applies to --layout real (ours trains its own vocabulary)")
            from radscribe.model.tiny import build_tiny_model, dataset_corpus

            corpus = dataset_corpus(a.corpus_dataset) if a.corpus_dataset else None
            options = {name: value for name, value in (("vocab_size", a.vocab_size), ("min_pixels", a.min_pixels),
                                                       ("max_pixels", a.max_pixels)) if value is not None}
            out = build_tiny_model(a.arch, a.out, a.seed, corpus=corpus, **sizes, **options)
        print(out)

    p.set_defaults(handler=run)


def cmd_train(sub) -> None:
    p = sub.add_parser("train", help="LoRA / QLoRA fine-tuning of a local Qwen-VL model on a prepared dataset")
    _overrides(p)
    p.add_argument("--model", help="base model folder (model.path)")
    p.add_argument("--data", help="prepared dataset folder (data.dataset)")
    p.add_argument("--out", help="run folder (output.dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    p.add_argument("--deepspeed", help="z2, z3 or a DeepSpeed JSON file (train.deepspeed)")
    p.add_argument("--nproc", type=int, help="processes to launch through torchrun (train.nproc)")
    p.add_argument("--emit-llamafactory", action="store_true",
                   help="only write OUT/llamafactory.yaml + OUT/dataset_info.json (the same recipe), do not train")

    def run(a):
        from radscribe.train import config_from_args, emit_llamafactory, train

        cfg = config_from_args(a.config, a.overrides, **{
            "model.path": a.model, "data.dataset": a.data, "output.dir": a.out,
            "output.resume": True if a.resume else None, "train.deepspeed": a.deepspeed, "train.nproc": a.nproc})
        if a.emit_llamafactory:
            print(emit_llamafactory(cfg))
            return
        print(train(cfg))

    p.set_defaults(handler=run)


# --- eval / score / audit / report ---
def cmd_eval(sub) -> None:
    p = sub.add_parser("eval", help="batched generation on a split; BLEU-4/ROUGE as LLaMA-Factory + clinical checks")
    p.add_argument("--model", required=True, help="base model folder")
    p.add_argument("--adapter", default=None, help="run folder (or its adapter/); omit to evaluate the base model")
    p.add_argument("--data", required=True, help="prepared dataset folder")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument("--ablate", choices=["blank", "shuffle"], default=None, help="image-grounding check")
    p.add_argument("--out", default=None, help="output root (default RUN/eval); results go to OUT/<split>[-<ablate>]")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--workers", type=int, default=1, help="processes for BLEU/ROUGE scoring")

    def run(a):
        from radscribe.evaluate.predict import EvalConfig, evaluate

        evaluate(EvalConfig(model=a.model, data=a.data, adapter=a.adapter, split=a.split, batch_size=a.batch_size,
                            max_new_tokens=a.max_new_tokens, limit=a.limit, ablate=a.ablate, out=a.out,
                            temperature=a.temperature, top_p=a.top_p, seed=a.seed, dtype=a.dtype,
                            n_boot=a.n_boot, workers=a.workers))

    p.set_defaults(handler=run)


def cmd_score(sub) -> None:
    p = sub.add_parser("score", help="score an existing generated_predictions.jsonl")
    p.add_argument("file", help="a generated_predictions.jsonl (LLaMA-Factory, vLLM or ours)")
    p.add_argument("--out", default=None, help="also write scores.json, predict_results.json, per_sample.jsonl here")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--workers", type=int, default=1, help="processes for BLEU/ROUGE scoring")

    def run(a):
        from radscribe.evaluate.predict import score_file

        score_file(a.file, out=a.out, n_boot=a.n_boot, workers=a.workers)

    p.set_defaults(handler=run)


def cmd_audit(sub) -> None:
    p = sub.add_parser("audit", help="leakage audit of a prepared dataset across train/val")
    p.add_argument("dataset", help="prepared dataset folder")
    p.add_argument("--near-threshold", type=int, default=4, help="pHash Hamming distance counted as near duplicate")
    p.add_argument("--strict", action="store_true", help="exit non-zero when the leak share exceeds --max-rate")
    p.add_argument("--max-rate", type=float, default=0.0, help="tolerated share of val rows flagged (0-1)")

    def run(a):
        from radscribe.evaluate.audit import AuditConfig, audit, check_strict

        cfg = AuditConfig(dataset=a.dataset, near_threshold=a.near_threshold, max_rate=a.max_rate)
        result = audit(cfg)
        print(result.table())
        if a.strict:
            check_strict(result, cfg)

    p.set_defaults(handler=run)


def cmd_report(sub) -> None:
    p = sub.add_parser("report", help="self-contained HTML + Markdown report of one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders or eval output folders; the first is the baseline")
    p.add_argument("--out", default=None, help="output folder (default FIRST_RUN/report)")
    p.add_argument("--samples", type=int, default=6, help="sample images shown with their reports")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the paired comparisons")

    def run(a):
        from radscribe.evaluate.report import report

        report(a.runs, out=a.out, n_samples=a.samples, n_boot=a.n_boot)

    p.set_defaults(handler=run)


# --- chat / serve / export ---
def cmd_chat(sub) -> None:
    p = sub.add_parser("chat", help="stream a report for an image (or DICOM) in the terminal")
    p.add_argument("--model", required=True, help="base model folder (or a merged export)")
    p.add_argument("--adapter", default=None, help="a `radscribe train` run folder or a PEFT adapter folder")
    p.add_argument("--image", required=True, help="PNG/JPEG/WebP, DICOM or NIfTI file")
    p.add_argument("--window", default=None, help="DICOM/NIfTI window: auto, multi, brain, lung, bone, ...")
    p.add_argument("--prompt", default="图片中的诊断结果是怎样?", help="the first question")
    p.add_argument("-i", "--interactive", action="store_true", help="then take follow-up questions (empty line ends)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")

    def run(a):
        from radscribe.serve.chat import chat

        chat(a.model, a.image, adapter=a.adapter, prompt=a.prompt, window=a.window, interactive=a.interactive,
             max_new_tokens=a.max_new_tokens, temperature=a.temperature, dtype=a.dtype, device=a.device)

    p.set_defaults(handler=run)


def cmd_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API and web page")
    p.add_argument("--model", required=True, help="base model folder, or a `radscribe export` folder")
    p.add_argument("--adapter", default=None, help="run or adapter folder (hf backend only)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers + our batching (CPU or GPU); vllm: vLLM on a merged export (GPU)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: env RADSCRIBE_API_KEY)")
    p.add_argument("--model-name", default="radscribe", help="model id in /v1/models")
    p.add_argument("--allow-folder", default=None, help="let image_url read local files inside this folder")
    p.add_argument("--allow-host", action="append", default=[], help="let image_url fetch from this host (repeat)")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-mb", type=float, default=16, help="largest request body")
    p.add_argument("--max-image-mb", type=float, default=20, help="largest encoded image")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image width x height")
    p.add_argument("--max-batch", type=int, default=8, help="requests generated together (1 = no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for company")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--quantize", choices=["4bit"], default=None, help="load the hf backend in bitsandbytes nf4")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--max-model-len", type=int, default=8192, help="vllm backend: context length")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90, help="vllm backend: GPU memory share")

    def run(a):
        import os
        from pathlib import Path

        api_key = a.api_key or os.environ.get("RADSCRIBE_API_KEY") or None
        if a.backend == "vllm":
            from radscribe.serve.vllm import VllmOptions, serve_vllm

            if a.adapter:
                raise RadscribeError("--backend vllm serves a merged model: run `radscribe export --model BASE "
                                     "--adapter RUN OUT` and pass --model OUT (vLLM cannot put LoRA on fused MoE experts)")
            code = serve_vllm(a.model, a.host, a.port, a.model_name, api_key,
                              VllmOptions(max_model_len=a.max_model_len,
                                          gpu_memory_utilization=a.gpu_memory_utilization),
                              allow_hosts=a.allow_host, allow_folder=a.allow_folder)
            if code:
                raise RadscribeError(f"vLLM exited with status {code}")
            return
        from radscribe.serve.api import ServeConfig, serve
        from radscribe.serve.safety import ImagePolicy

        if a.allow_folder and not Path(a.allow_folder).is_dir():
            raise RadscribeError(f"--allow-folder {a.allow_folder} is not a folder")
        policy = ImagePolicy(max_image_bytes=int(a.max_image_mb * 1024 * 1024), max_pixels=a.max_pixels,
                             allow_folder=Path(a.allow_folder) if a.allow_folder else None, allow_hosts=a.allow_host)
        cfg = ServeConfig(host=a.host, port=a.port, api_key=api_key, model_name=a.model_name,
                          max_body_bytes=int(a.max_body_mb * 1024 * 1024), max_tokens_limit=a.max_tokens,
                          images=policy, max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms)
        serve(a.model, adapter=a.adapter, cfg=cfg, dtype=a.dtype, quantization=a.quantize, device=a.device)

    p.set_defaults(handler=run)


def cmd_export(sub) -> None:
    p = sub.add_parser("export", help="merge the adapter into a standalone model folder (vLLM, 4-bit)")
    p.add_argument("out", help="new folder for the merged model")
    p.add_argument("--model", required=True, help="base model folder")
    p.add_argument("--adapter", required=True, help="a `radscribe train` run folder or a PEFT adapter folder")
    p.add_argument("--quantize", choices=["4bit"], default=None, help="save bitsandbytes nf4 (pre-quantised)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="merge dtype")
    p.add_argument("--device", default="cpu", help="where to merge: cpu (default) or cuda")

    def run(a):
        from radscribe.export import export

        export(a.model, a.adapter, a.out, quantize=a.quantize, dtype=a.dtype, device=a.device)

    p.set_defaults(handler=run)


# --- demo ---
def cmd_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the embedded default: synth -> prepare -> train -> eval -> report")
    p.add_argument("--out", default=None, help="demo folder (default runs/demo)")
    p.add_argument("--lang", choices=["zh", "en"], default=None, help="report language (default zh)")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")
    _overrides(p)

    def run(a):
        from radscribe.demo import config_from_args, demo

        result = demo(config_from_args(a.config, a.overrides, out=a.out, lang=a.lang), fresh=a.fresh)
        if not result["improved"]:
            raise RadscribeError("the fine-tuned model did not beat the base with non-overlapping CIs "
                                 f"(see {result['report']})")

    p.set_defaults(handler=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radscribe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (cmd_synth, cmd_prepare, cmd_tiny_model, cmd_train, cmd_eval, cmd_score, cmd_audit, cmd_report,
                cmd_chat, cmd_serve, cmd_export, cmd_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except RadscribeError as err:
        print(f"radscribe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"radscribe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
