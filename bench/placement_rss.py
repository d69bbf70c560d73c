"""Peak host memory per rank while `radscribe train` builds the model, 2 CPU processes (torchrun, gloo).

Run as: OMP_NUM_THREADS=1 python bench/placement_rss.py [--before-ref main] [--out bench/results/train.md]

Each rank runs set-up's model build exactly as `radscribe train --nproc 2` does (process group, TrainingArguments,
then `radscribe.train._build_model`: load + LoRA) on a real-layout Qwen3-VL-MoE folder widened so that its weights
dominate the interpreter (text hidden 512: ~170 M parameters, ~340 MB in bf16), and reports its peak RSS (VmHWM)
before and after the build and the bytes of its own weights. "before" runs the tree of --before-ref (exported with
`git archive`), "after" this checkout. Writes the <!-- placement-rss --> section of bench/results/train.md.
On a CPU the device is the host, so every non-ZeRO-3 rank must hold a whole copy; what changes on GPUs (each rank
reads its weights straight onto cuda:LOCAL_RANK) is what tests/test_train_recipes.py checks by the device map.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ddp", "z2", "z3")


def _proc_mib(path: str, key: str) -> float:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in {path}")


def _vm_hwm_mib() -> float:
    return _proc_mib("/proc/self/status", "VmHWM")


def child(args) -> None:
    """One torchrun worker: the model build of set-up, nothing else."""
    from radscribe import dist
    from radscribe.config import config_from_args
    from radscribe.train import TrainConfig, _build_model, _training_arguments

    deepspeed = None if args.stage == "ddp" else args.stage
    cfg = config_from_args(TrainConfig, None, ["train.precision=bf16", "train.nproc=2"],
                           **{"model.path": args.model, "output.dir": args.work, "train.deepspeed": deepspeed})
    dist.init_process_group(deepspeed=bool(deepspeed))
    # kept alive, as set-up keeps it: under ZeRO-3 it is what makes from_pretrained load partitioned
    training_args = _training_arguments(cfg, Path(args.work) / "checkpoints", has_val=False)  # noqa: F841
    before, anon_before = _vm_hwm_mib(), _proc_mib("/proc/self/status", "RssAnon")
    model, _ = _build_model(cfg)
    after = _vm_hwm_mib()
    held = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in model.parameters()]
    for tensor in held:  # read every page of this rank's weights, as a forward pass does
        tensor.detach().view(-1)[::512].float().sum()
    mapped_rss, mapped_pss = _safetensors_mapped_mib()
    info = dist.get_dist_info()
    (Path(args.work) / f"rank{info.rank}.json").write_text(json.dumps(
        {"rank": info.rank, "peak_rss_before_mib": round(before), "peak_rss_after_mib": round(after),
         "own_weights_mib": round(sum(t.numel() * t.element_size() for t in held) / 2**20),
         # after every weight page was read: private memory the build added, and the weights still mapped from
         # the safetensors files (page cache, one copy per node however many ranks map it)
         "anon_growth_mib": round(_proc_mib("/proc/self/status", "RssAnon") - anon_before),
         "mapped_rss_mib": round(mapped_rss), "mapped_pss_mib": round(mapped_pss)}))
    dist.barrier()


def _safetensors_mapped_mib() -> tuple[float, float]:
    """Rss and Pss of this process's mappings of *.safetensors files (/proc/self/smaps)."""
    rss = pss = 0.0
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = fields[-1].endswith(".safetensors")
        elif inside and fields[0] in ("Rss:", "Pss:"):
            value = int(fields[1]) / 1024
            rss, pss = (rss + value, pss) if fields[0] == "Rss:" else (rss, pss + value)
    return rss, pss


def run_tree(tree: Path, stage: str, model: Path, work: Path) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")},
           "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", str(Path(__file__).resolve()), "--child", "--stage", stage,
               "--model", str(model), "--work", str(work)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tree)
    if done.returncode:
        raise SystemExit(f"{stage} in {tree} failed:\n{done.stderr[-3000:]}")
    return [json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1)]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-ref", default="main", help="git ref of the 'before' tree")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.md"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from train import replace_section  # bench/train.py: the section writer of bench/results/train.md

    from radscribe.model.real_layout import Widths, build_real_layout_model

    with tempfile.TemporaryDirectory(prefix="radscribe-rss-") as tmp:
        tmp = Path(tmp)
        before_sha = subprocess.run(["git", "rev-parse", "--short", args.before_ref], cwd=ROOT, check=True,
                                    capture_output=True, text=True).stdout.strip()
        after_sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                                   capture_output=True, text=True).stdout.strip()
        before_tree = tmp / "before"
        before_tree.mkdir()
        archive = subprocess.run(["git", "archive", args.before_ref], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(before_tree)], input=archive.stdout, check=True)
        model = build_real_layout_model("qwen3_vl_moe", tmp / "model", widths=Widths(text_hidden=512, experts=8))
        size_mib = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
        load = os.getloadavg()[0]
        rows = []
        for stage in STAGES:
            for label, tree, sha in (("before", before_tree, before_sha), ("after", ROOT, after_sha)):
                for r in run_tree(tree, stage, model, tmp / f"{label}-{stage}"):
                    rows.append((stage, f"{label} ({sha})", r))
                    print(stage, label, r, flush=True)
        load_after = os.getloadavg()[0]
    lines = [
        "## Peak host RSS per rank while building the model (2 CPU processes)", "",
        "Command: `OMP_NUM_THREADS=1 python bench/placement_rss.py` (each rank: process group, TrainingArguments, "
        "`radscribe.train._build_model` = load + LoRA, as `radscribe train --nproc 2` does). Model: real-layout "
        f"Qwen3-VL-MoE, text hidden 512, 4 layers, 8 experts; {size_mib:.0f} MiB of bf16 safetensors. 2 shared "
        f"CPU cores, 1-min load average {load:.1f} before, {load_after:.1f} after. VmHWM from /proc/self/status.",
        "",
        "| stage | tree | rank | this rank's weights | peak RSS before the build | after | "
        "private memory added (RssAnon) | safetensors mapped: Rss | Pss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, tree, r in rows:
        lines.append(f"| {stage} | {tree} | {r['rank']} | {r['own_weights_mib']} | {r['peak_rss_before_mib']} | "
                     f"{r['peak_rss_after_mib']} | {r['anon_growth_mib']} | {r['mapped_rss_mib']} | "
                     f"{r['mapped_pss_mib']} |")
    lines += ["", "All figures MiB; the last three after every page of the rank's weights was read. Mapped safetensors "
              "pages are the page cache: two ranks mapping the same file hold one physical copy (Pss splits it)."]
    replace_section(Path(args.out), "placement-rss", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
