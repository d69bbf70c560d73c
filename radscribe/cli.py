"""The `radscribe` command: parsing only. Each subcommand parses its flags and calls one stage function.

Run as: radscribe {synth,prepare,tiny-model,train,eval,score,audit,report,chat,serve,export,llamacpp,demo} --help

Every stage takes `--config PRESET_OR_YAML` plus dotted `FIELD=VALUE` overrides; its flags are shorthands for
config fields, applied last, and its `--help` lists every field with its default and docstring (`Stage`).
Stage modules are imported only for the subcommand being run, so `radscribe --help` and the data commands start
fast (importing transformers' model classes alone takes 8-10 s on this machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from typing import Callable

from radscribe.errors import RadscribeError

OVERRIDE = re.compile(r"([A-Za-z_]\w*)(\.\w+)*=")


class Stage:
    """One subcommand's config plumbing, the same for every stage: `--config PRESET_OR_YAML`, `FIELD=VALUE`
    overrides, and flags that are shorthands for config fields (applied last), each documented from the field's
    docstring and default; the epilog lists every field (`radscribe.config.config_help`)."""

    def __init__(self, parser: argparse.ArgumentParser, cls, example: str = ""):
        from radscribe.config import config_help

        self.parser, self.cls = parser, cls
        self.flags: list[tuple[str, str, str, Callable | None]] = []  # (option, argparse dest, field, convert)
        self.positionals: list[tuple[str, bool]] = []  # (argparse dest, takes several)
        self.fields = {f.name for f in dataclasses.fields(cls)}
        parser.add_argument("--config", metavar="PRESET_OR_YAML",
                            help="a preset (radscribe/presets/*.yaml) or a YAML file of the fields listed below")
        parser.epilog = config_help(cls) + (f"\n\nexample:\n  {example}" if example else "")

    def flag(self, option: str, field: str | None = None, *, convert: Callable | None = None,
             help: str | None = None, **kwargs) -> None:
        """`--option` (or a positional NAME) for `field` (default: the option's name with - as _)."""
        from radscribe.config import field_doc, format_value, literal_choices

        field = field or option.lstrip("-").replace("-", "_")
        info = field_doc(self.cls, field)
        hint = info.hint
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: the flag gives an X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        many = typing.get_origin(hint) in (list, tuple)
        if literal_choices(info.hint) and convert is None:
            kwargs.setdefault("choices", list(literal_choices(info.hint)))
        elif hint is bool:
            kwargs.setdefault("action", "store_true")
        elif hint in (int, float) and not many:
            kwargs.setdefault("type", hint)
        required = info.default is dataclasses.MISSING
        text = help or f"{info.line} ({field}; {'required' if required else 'default ' + format_value(info.default)})"
        dest = f"flag_{len(self.flags)}"
        if option.startswith("-"):
            if many:
                kwargs.setdefault("action", "append")
            if kwargs.get("action") != "store_true" and "choices" not in kwargs:
                kwargs.setdefault("metavar", option.lstrip("-").upper().replace("-", "_"))
            self.parser.add_argument(option, dest=dest, default=None, help=text.replace("%", "%%"), **kwargs)
        else:
            self.parser.add_argument(dest, metavar=option, nargs="*" if many else "?", default=None,
                                     help=text.replace("%", "%%"), **kwargs)
            self.positionals.append((dest, many))
        self.flags.append((option if option.startswith("-") else option.upper(), dest, field, convert))

    def run(self, handler: Callable) -> None:
        """`handler(cfg, args)` runs the stage on the resolved config."""
        self.parser.add_argument("overrides", nargs="*", metavar="FIELD=VALUE",
                                 help="config overrides, applied after --config and before the flags")
        self.parser.set_defaults(stage=self, handler=lambda a: handler(self.config(a), a))

    def config(self, a: argparse.Namespace):
        from radscribe.config import config_from_args

        overrides, plain = [], []
        for token in self._positional_tokens(a):
            known = OVERRIDE.match(token) and OVERRIDE.match(token).group(1) in self.fields
            (overrides if known else plain).append(token)
        for dest, many in self.positionals:  # the plain tokens fill the declared positionals in order
            setattr(a, dest, plain if many else (plain[0] if plain else None))
            plain = [] if many else plain[1:]
        if any(not OVERRIDE.match(t) for t in plain):
            self.parser.error(f"unrecognized arguments: {' '.join(plain)}")
        flags = {}
        for _, dest, field, convert in self.flags:
            value = getattr(a, dest)
            if value is not None and value != []:
                flags[field] = convert(value) if convert else value
        # The fields the command line sets (a backend that cannot honour one refuses it, even at its default).
        a.given_fields = given = set(flags) | {t.split("=")[0] for t in overrides}
        if not a.config:  # name the flag of a required field left out (the loader would name only the field)
            for option, _, field, _ in self.flags:
                if field not in given and self._required(field):
                    raise RadscribeError(f"{option} is required ({field})")
        # a FIELD=VALUE with an unknown field goes to the loader, whose error names the known fields
        return config_from_args(self.cls, a.config, overrides + plain, **flags)

    def _required(self, field: str) -> bool:
        f = next((f for f in dataclasses.fields(self.cls) if f.name == field), None)
        return f is not None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING

    def _positional_tokens(self, a) -> list[str]:
        tokens: list[str] = []
        for dest, many in self.positionals:
            value = getattr(a, dest)
            tokens += (value or []) if many else ([value] if value is not None else [])
        return tokens + list(a.overrides) + list(getattr(a, "extras", []))


# --- data ---
def cmd_synth(p) -> None:
    from radscribe.data.synth import SynthConfig

    s = Stage(p, SynthConfig, example="radscribe synth --out data/synth --n 200 --lang en")
    for option in ("--out", "--n", "--seed", "--lang", "--size", "--shard-rows", "--format", "--slices-per-patient",
                   "--volumes", "--normal-fraction", "--workers"):
        s.flag(option)

    def run(cfg, a):
        from radscribe.data.synth import synth

        paths = synth(cfg)
        print(f"{cfg.out}: {cfg.n} rows in {len(paths)} parquet shard(s)")

    s.run(run)


def cmd_prepare(p) -> None:
    from radscribe.data.prepare import PrepareConfig

    s = Stage(p, PrepareConfig, example="radscribe prepare data/synth --out data/dataset --group-by patient")
    s.flag("inputs")
    for option in ("--out", "--images", "--val-ratio", "--group-by", "--near-threshold", "--format", "--lang",
                   "--prompt", "--prompts-file", "--seed", "--max-pixels", "--verify", "--overwrite", "--workers",
                   "--dicom", "--nifti", "--reports", "--window", "--slices", "--keep-ids", "--allow-burned-in",
                   "--id-key", "--key"):
        s.flag(option)

    def run(cfg, a):
        from radscribe.data.prepare import prepare

        prepare(cfg)

    s.run(run)


# --- tiny-model / train ---
def cmd_tiny_model(p) -> None:
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


def cmd_train(p) -> None:
    from radscribe.train_config import TrainConfig

    s = Stage(p, TrainConfig, example="a short run on a tiny model (radscribe tiny-model M; radscribe synth; "
              "radscribe prepare):\n  radscribe train --model M --data data/dataset --out runs/short "
              "train.max_steps=20 data.max_samples=64 train.precision=fp32")
    s.flag("--model", "model.path")
    s.flag("--data", "data.dataset")
    s.flag("--out", "output.dir")
    s.flag("--resume", "output.resume")
    s.flag("--deepspeed", "train.deepspeed")
    s.flag("--nproc", "train.nproc")
    s.flag("--nnodes", "train.nnodes")
    s.flag("--node-rank", "train.node_rank")
    s.flag("--master-addr", "train.master_addr")
    s.flag("--master-port", "train.master_port")
    p.add_argument("--emit-llamafactory", action="store_true",
                   help="only write OUT/llamafactory.yaml + OUT/dataset_info.json (the same recipe), do not train")
    p.add_argument("--dry-run", action="store_true",
                   help="only print the memory plan per GPU (from MODEL/config.json alone; --nproc x --nnodes GPUs), "
                        "do not load or train")
    p.add_argument("--gpu-mem", type=float, metavar="GB",
                   help="with --dry-run: fail when the plan needs more than GB (1e9 bytes) per GPU (default: no limit)")

    def run(cfg, a):
        if a.gpu_mem is not None and not a.dry_run:
            raise RadscribeError("--gpu-mem only applies to the plan: add --dry-run")
        if a.dry_run and a.emit_llamafactory:
            raise RadscribeError("--dry-run and --emit-llamafactory each replace training; pass one of them")
        if a.dry_run:
            from radscribe.plan import format_plan, plan

            print(format_plan(plan(cfg, gpu_mem_gb=a.gpu_mem), cfg))
            return
        if a.emit_llamafactory:
            from radscribe.interop.llamafactory import emit_llamafactory

            print(emit_llamafactory(cfg))
            return
        from radscribe.train import train

        print(train(cfg))

    s.run(run)


# --- eval / score / audit / report ---
def cmd_eval(p) -> None:
    from radscribe.evaluate.predict import EvalConfig

    s = Stage(p, EvalConfig, example="radscribe eval --model M --adapter runs/r --data data/dataset --limit 16\n"
              "  radscribe eval --endpoint http://127.0.0.1:8000/v1 --data data/dataset --out evals/served "
              "--concurrency 4")
    for option in ("--model", "--adapter", "--data", "--split", "--batch-size", "--max-new-tokens", "--limit",
                   "--ablate", "--out", "--temperature", "--top-p", "--top-k", "--repetition-penalty", "--seed",
                   "--n-boot", "--workers", "--overwrite", "--endpoint", "--endpoint-model", "--concurrency",
                   "--api-key-env"):
        s.flag(option)
    s.flag("--dtype", choices=["auto", "bf16", "fp16", "fp32"])

    def run(cfg, a):
        from radscribe.evaluate.predict import evaluate

        evaluate(cfg)

    s.run(run)


def cmd_score(p) -> None:
    p.add_argument("file", help="a generated_predictions.jsonl (LLaMA-Factory, vLLM or ours)")
    p.add_argument("--out", default=None, help="also write scores.json, predict_results.json, per_sample.jsonl here")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--workers", type=int, default=1, help="processes for BLEU/ROUGE scoring")

    def run(a):
        from radscribe.evaluate.predict import score_file

        score_file(a.file, out=a.out, n_boot=a.n_boot, workers=a.workers)

    p.set_defaults(handler=run)


def cmd_audit(p) -> None:
    from radscribe.evaluate.audit import AuditConfig

    s = Stage(p, AuditConfig, example="radscribe audit data/dataset --strict")
    s.flag("dataset")
    for option in ("--near-threshold", "--strict", "--max-rate", "--examples"):
        s.flag(option)

    def run(cfg, a):
        from radscribe.evaluate.audit import audit, check_strict

        result = audit(cfg)
        print(result.table())
        if cfg.strict:
            check_strict(result, cfg)

    s.run(run)


def cmd_report(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders or eval output folders; the first is the baseline")
    p.add_argument("--out", default=None, help="output folder (default FIRST_RUN/report)")
    p.add_argument("--samples", type=int, default=6, help="sample images shown with their reports")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the paired comparisons")

    def run(a):
        from radscribe.evaluate.report import report

        report(a.runs, out=a.out, n_samples=a.samples, n_boot=a.n_boot)

    p.set_defaults(handler=run)


# --- chat / serve / export ---
def cmd_chat(p) -> None:
    p.add_argument("--model", required=True, help="base model folder (or a merged export)")
    p.add_argument("--adapter", default=None, help="a `radscribe train` run folder or a PEFT adapter folder")
    p.add_argument("--image", required=True, help="PNG/JPEG/WebP, DICOM or NIfTI file")
    p.add_argument("--window", default=None, help="DICOM/NIfTI window: auto, multi, brain, lung, bone, ...")
    p.add_argument("--prompt", default="图片中的诊断结果是怎样?", help="the first question")
    p.add_argument("-i", "--interactive", action="store_true", help="then take follow-up questions (empty line ends)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the model's generation_config.json)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass (default: the model's)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens, 0 = all "
                   "(default: the model's)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")

    def run(a):
        from radscribe.serve.chat import chat

        chat(a.model, a.image, adapter=a.adapter, prompt=a.prompt, window=a.window, interactive=a.interactive,
             max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
             dtype=a.dtype, device=a.device)

    p.set_defaults(handler=run)


def cmd_serve(p) -> None:
    from radscribe.serve.api import ServeConfig

    s = Stage(p, ServeConfig, example="radscribe serve --model M --adapter runs/r --port 8000")
    for option in ("--model", "--adapter", "--backend", "--host", "--port", "--api-key", "--model-name", "--dtype",
                   "--device", "--max-batch", "--batch-wait-ms"):
        s.flag(option)
    s.flag("--quantize", "quantization")
    s.flag("--allow-folder", "images.allow_folder")
    s.flag("--allow-host", "images.allow_hosts")
    s.flag("--max-tokens", "max_tokens_limit")
    s.flag("--max-body-mb", "max_body_bytes", type=float, convert=_mib, help="largest request body in MB (default 16)")
    s.flag("--max-image-mb", "images.max_image_bytes", type=float, convert=_mib,
           help="largest encoded image in MB (default 20)")
    s.flag("--max-pixels", "images.max_pixels")
    s.flag("--fetch-timeout", "images.fetch_timeout_s")
    for option in ("--max-prompt-tokens", "--max-queue", "--max-queue-per-client", "--max-queued-pixels",
                   "--max-in-flight", "--client-mb-per-s", "--client-pixels-per-s"):
        s.flag(option)
    s.flag("--allow-origin", "allow_origins")
    s.flag("--header-timeout", "header_timeout_s")
    s.flag("--body-timeout", "body_timeout_s")
    s.flag("--max-model-len", "vllm.max_model_len")
    s.flag("--gpu-memory-utilization", "vllm.gpu_memory_utilization")
    s.flag("--vllm-python", "vllm.python")

    def run(cfg, a):
        import os

        cfg.api_key = cfg.api_key or os.environ.get("RADSCRIBE_API_KEY") or None
        if cfg.images.allow_folder is not None and not cfg.images.allow_folder.is_dir():
            raise RadscribeError(f"--allow-folder {cfg.images.allow_folder} is not a folder")
        if cfg.backend == "llamacpp":
            from radscribe.serve.llamacpp import serve_llamacpp

            serve_llamacpp(cfg)
            return
        if cfg.backend == "vllm":
            from radscribe.serve.vllm import serve_vllm

            code = serve_vllm(cfg, given=a.given_fields)  # every option passed on to vLLM or refused there
            if code:
                raise RadscribeError(f"vLLM exited with status {code}")
            return
        from radscribe.serve.vllm import VllmOptions

        if cfg.vllm != VllmOptions() or any(f.startswith("vllm.") for f in a.given_fields):
            raise RadscribeError("--max-model-len, --gpu-memory-utilization and vllm.* settings only apply with "
                                 "--backend vllm")
        from radscribe.serve.api import serve

        serve(cfg.model, adapter=cfg.adapter, cfg=cfg, dtype=cfg.dtype, quantization=cfg.quantization,
              device=cfg.device)

    s.run(run)


def _mib(megabytes: float) -> int:
    return int(megabytes * 1024 * 1024)


def cmd_export(p) -> None:
    from radscribe.export import ExportConfig

    s = Stage(p, ExportConfig, example="radscribe export --model M --adapter runs/r exports/r --quantize 4bit\n"
              "  radscribe export --format gguf --quantize q4_k_m --model M --adapter runs/r exports/r-gguf\n"
              "  radscribe export --dry-run --format gguf --quantize q4_k_m --model M --gpu-mem 24")
    s.flag("out", "out_dir")
    s.flag("--model", "model_dir")
    s.flag("--adapter")
    s.flag("--format")
    s.flag("--quantize")
    s.flag("--dtype")
    s.flag("--device")
    s.flag("--dry-run")
    s.flag("--ctx")
    s.flag("--gpu-mem")
    s.flag("--bits-from")

    def run(cfg, a):
        from radscribe.export import run_export

        run_export(cfg)

    s.run(run)


def cmd_llamacpp(p) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    install = actions.add_parser("install", help="build the pinned llama.cpp (PyPI's llama-cpp-python sdist) into "
                                                 "the cache; a no-op when it is built")
    install.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: one per core)")
    install.add_argument("--sdist", default=None,
                         help="a llama-cpp-python sdist already downloaded (default: pip download it)")
    install.add_argument("--force", action="store_true", help="rebuild even when a build exists")
    actions.add_parser("path", help="print the folder holding the built binaries")

    def run(a):
        from radscribe.interop import llamacpp

        tools = llamacpp.install(jobs=a.jobs, sdist=a.sdist, force=a.force) if a.action == "install" \
            else llamacpp.find()
        print(tools.bin)

    p.set_defaults(handler=run)


# --- demo ---
def cmd_demo(p) -> None:
    from radscribe.demo import DemoConfig

    s = Stage(p, DemoConfig, example="radscribe demo --out runs/demo --lang en finetune.steps=300")
    s.flag("--out")
    s.flag("--lang")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")

    def run(cfg, a):
        from radscribe.demo import demo

        result = demo(cfg, fresh=a.fresh)
        if not result["improved"]:
            raise RadscribeError("the fine-tuned model did not beat the base with non-overlapping CIs "
                                 f"(see {result['report']})")

    s.run(run)


COMMANDS = {
    "synth": ("write MedTrinity-shaped parquet shards of phantom images with reports", cmd_synth),
    "prepare": ("image/report data -> ShareGPT multimodal dataset (LLaMA-Factory-readable)", cmd_prepare),
    "tiny-model": ("write a tiny randomly initialised Qwen-VL model folder (offline)", cmd_tiny_model),
    "train": ("LoRA / QLoRA fine-tuning of a local Qwen-VL model on a prepared dataset", cmd_train),
    "eval": ("batched generation on a split; BLEU-4/ROUGE as LLaMA-Factory + clinical checks", cmd_eval),
    "score": ("score an existing generated_predictions.jsonl", cmd_score),
    "audit": ("leakage audit of a prepared dataset across train/val", cmd_audit),
    "report": ("self-contained HTML + Markdown report of one or more runs", cmd_report),
    "chat": ("stream a report for an image (or DICOM) in the terminal", cmd_chat),
    "serve": ("OpenAI-compatible API and web page", cmd_serve),
    "export": ("merge the adapter into a standalone model folder (vLLM, 4-bit) or llama.cpp GGUF files", cmd_export),
    "llamacpp": ("build llama.cpp's tools (llama-server, llama-mtmd-cli, llama-quantize) once, or show where",
                 cmd_llamacpp),
    "demo": ("the whole pipeline on the embedded default: synth -> prepare -> train -> eval -> report", cmd_demo),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("radscribe")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that subcommand gets its flags (the others import nothing)."""
    parser = argparse.ArgumentParser(prog="radscribe", description="Turn a general vision-language model into a "
                                     "radiology report assistant: prepare -> train -> eval -> serve. "
                                     "`radscribe COMMAND --help` lists each stage's config fields.")
    parser.add_argument("--version", action="version", version=f"radscribe {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, build) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if only is None or only == name:
            build(p)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; only the named subcommand's stage module is imported."""
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else "")
    # Known args only: FIELD=VALUE overrides and positionals may come after options (argparse would refuse them)
    args, extras = parser.parse_known_args(argv)
    if extras and (getattr(args, "stage", None) is None or any(e.startswith("-") for e in extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    args.extras = extras
    return args


def stage_config(argv: list[str]):
    """The resolved config a stage's command line asks for, without running the stage."""
    args = parse(argv)
    return args.stage.config(args)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
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
