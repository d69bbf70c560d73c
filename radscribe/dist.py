"""Who this process is in a (possibly) multi-process run: the one place that reads rank, world size and device.

Every other module asks here (nanochat's `get_dist_info`). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE in each
worker; a process started without it is rank 0 of 1. Also here: starting the process group, the barrier, a free
port, and the torchrun command that re-launches a stage in N processes on this node, alone or as one node of
several (`Rendezvous`: torchrun's static rendezvous at node 0's MASTER_ADDR:MASTER_PORT).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    launched: bool
    """Started by a launcher (torchrun, DeepSpeed): LOCAL_RANK is set."""
    rank: int
    """Global rank (0 = the main process, the only one that writes run files)."""
    local_rank: int
    """Rank on this machine: the index of this process's GPU."""
    world_size: int
    """Processes in the whole run."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def get_dist_info() -> DistInfo:
    env = os.environ
    return DistInfo(launched="LOCAL_RANK" in env, rank=int(env.get("RANK", "0")),
                    local_rank=int(env.get("LOCAL_RANK", "0")), world_size=int(env.get("WORLD_SIZE", "1")))


def is_main() -> bool:
    return get_dist_info().is_main


def world_size() -> int:
    return get_dist_info().world_size


def device() -> str:
    """This process's device: its local GPU (`cuda:LOCAL_RANK`) when CUDA is available, else `cpu`."""
    import torch

    return f"cuda:{get_dist_info().local_rank}" if torch.cuda.is_available() else "cpu"


def backend() -> str:
    """The collective backend: NCCL on GPUs, gloo on CPU."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def print0(message: str, prefix: str = "radscribe") -> None:
    """Print to stderr on the main process only."""
    if is_main():
        print(f"[{prefix}] {message}", file=sys.stderr, flush=True)


def print_each(message: str, prefix: str = "radscribe") -> None:
    """Print to stderr from every process, naming its rank when there are several (what differs per rank)."""
    info = get_dist_info()
    who = f" rank {info.rank}/{info.world_size}" if info.world_size > 1 else ""
    sys.stderr.write(f"[{prefix}{who}] {message}\n")  # one write: ranks printing at once do not split lines
    sys.stderr.flush()


def init_process_group(deepspeed: bool) -> list[str]:
    """Start the process group (before TrainingArguments and the model load, as ZeRO-3 on CPU requires).

    DeepSpeed needs a process group even for one process, and without a launcher it goes looking for MPI, so a
    launcher-less DeepSpeed run gets single-process rank variables. Returns the variables it set itself, for
    `forget_launcher_env` afterwards.
    """
    added: list[str] = []
    if deepspeed and "RANK" not in os.environ:
        single = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        added = [k for k in single if k not in os.environ]
        os.environ.update({k: single[k] for k in added})
    elif world_size() <= 1:
        return added
    import torch.distributed as dist

    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend())
    elif not dist.is_initialized():
        dist.init_process_group(backend=backend())
    return added


def forget_launcher_env(added: list[str]) -> None:
    """Unset what `init_process_group` set, so a later stage in this process does not think it is a worker."""
    for key in added:
        os.environ.pop(key, None)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of a run meet: torchrun's static rendezvous, a TCP store at node 0's address and port."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    """None on one node: 127.0.0.1."""
    master_port: int | None = None
    """None on one node: a free port."""

    def check(self) -> None:
        """One clear line for a rendezvous that cannot work, before anything starts."""
        from radscribe.errors import RadscribeError

        if self.nnodes < 1:
            raise RadscribeError(f"train.nnodes must be at least 1 (got {self.nnodes})")
        if not 0 <= self.node_rank < self.nnodes:
            raise RadscribeError(f"train.node_rank {self.node_rank} is not in 0..{self.nnodes - 1} (--node-rank R "
                                 "with --nnodes N: 0 on the node that hosts the rendezvous)")
        if self.nnodes > 1 and (not self.master_addr or not self.master_port):
            raise RadscribeError(f"--nnodes {self.nnodes} needs --master-addr HOST and --master-port PORT (node 0's "
                                 "address and a free port there; the same on every node)")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise RadscribeError(f"train.master_port {self.master_port} is not a TCP port (1-65535)")

    def torchrun_flags(self) -> list[str]:
        return [f"--nnodes={self.nnodes}", f"--node_rank={self.node_rank}",
                f"--master_addr={self.master_addr or '127.0.0.1'}", f"--master_port={self.master_port or free_port()}"]


def torchrun_command(nproc: int, module: str, *args: str, rendezvous: Rendezvous = Rendezvous()) -> list[str]:
    """`python -m torch.distributed.run` starting `python -m MODULE ARGS` in `nproc` processes on this machine, as
    node `rendezvous.node_rank` of `rendezvous.nnodes`."""
    rendezvous.check()
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *rendezvous.torchrun_flags(),
            "-m", module, *args]


def launch(nproc: int, module: str, *args: str, prefix: str = "radscribe", rendezvous: Rendezvous = Rendezvous()) -> None:
    """Run `torchrun_command` in the foreground (the workers' output is ours); a failed worker is an error."""
    from radscribe.errors import RadscribeError

    command = torchrun_command(nproc, module, *args, rendezvous=rendezvous)
    print0(" ".join(command), prefix)
    code = subprocess.run(command).returncode
    if code != 0:
        where = f" on node {rendezvous.node_rank} of {rendezvous.nnodes}" if rendezvous.nnodes > 1 else ""
        raise RadscribeError(f"torchrun with {nproc} processes{where} failed (exit {code}); see the worker output "
                             "above")
