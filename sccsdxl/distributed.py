"""Several GPUs and nodes: one pipeline replica per process, one loadgen in rank 0.

Launch one process per GPU with torchrun (``torchrun --nproc-per-node N -m sccsdxl.distributed ...``), on
several nodes through torchrun's c10d rendezvous, or with ``srun`` (one task per GPU). Rank 0 runs loadgen
with one generator per rank: its own replica plus a ``RemoteReplica`` proxy for every other rank. The
Offline SUT gives the next batch to whichever generator is free, so a slower GPU never holds the others
back, and every response reaches loadgen in rank 0.

Messages between rank 0 and rank k (torch.distributed point-to-point):
  0 -> k   {"op": "work", "prompts": [...]}  or  {"op": "stop"}
  k -> 0   {"op": "hello", ...}  {"op": "images", "shape": [...]} then the uint8 images  {"op": "error", ...}
           {"op": "stats", ...} (the answer to stop)
Control messages are JSON over gloo (CPU tensors); the images travel as a uint8 tensor over NCCL on GPUs
(backend ``cpu:gloo,cuda:nccl``) and over gloo on the CPU. Every receive has a deadline and gloo notices a
dead peer at once, so rank 0 never waits forever: a lost rank stops the run with a message, and the run
directory keeps what was written.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import constants as C
from .data import sample_set
from .errors import DeviceError, KitError, ParameterError
from .harness import (MODES, RUN_FILE, BenchmarkRun, RunConfig, list_run_dirs, plan_batch_shapes, results_table,
                      run_benchmark)
from .pipeline import free_gpu_memory
from .record import write_json

BACKENDS = ("auto", "nccl", "gloo")
DEFAULT_TIMEOUT_S = 1800.0  # longest silence allowed from a peer: one batch plus model loading, generously
STOP_TIMEOUT_S = 120.0
EXIT_KIT_ERROR = 2
STOP = threading.Event()  # set by SIGTERM: finish the batches in flight, take no new ones


class RankLost(KitError):
    """A rank stopped answering: it died, or it was silent for longer than the timeout."""


class RankError(KitError):
    """A rank answered with an error (the model failed there); ``oom`` tells whether it ran out of memory."""

    def __init__(self, problem: str, fix: str | None = None, oom: bool = False):
        super().__init__(problem, fix)
        self.oom = oom


@dataclass(frozen=True)
class Cluster:
    """Where this process sits: its rank among all processes and its index on its own node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # torchrun | slurm | none

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def cluster_from_env(env: Mapping[str, str] | None = None) -> Cluster:
    """Rank and world size from torchrun's variables, else from an srun job step, else a single process."""
    env = os.environ if env is None else env
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            return Cluster(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), "torchrun")
        if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:  # inside srun, not sbatch
            return Cluster(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]),
                           int(env.get("SLURM_LOCALID", "0")), "slurm")
    except ValueError as exc:
        raise ParameterError(f"malformed rank variables in the environment ({exc})",
                             "launch with torchrun or srun, which set RANK/WORLD_SIZE or SLURM_PROCID") from None
    return Cluster()


def resolve_backend(backend: str, device: str) -> str:
    """The process-group backend: NCCL for images between GPUs (with gloo for control), gloo on the CPU."""
    if backend not in BACKENDS:
        raise ParameterError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    if backend == "nccl" and device != "cuda":
        raise ParameterError("backend nccl needs GPUs, but this run is on the CPU", "use --backend gloo (or auto)")
    if backend == "gloo" or device != "cuda":
        return "gloo"
    return "cpu:gloo,cuda:nccl"


def gpu_index(cluster: Cluster, available: int, host: str = "") -> int:
    """This process's GPU: its local rank, or the one GPU srun bound to the task (--gpus-per-task=1)."""
    if cluster.launcher == "slurm" and available == 1:
        return 0
    check_local_gpu(cluster.local_rank, available, host)
    return cluster.local_rank


def check_local_gpu(local_rank: int, available: int, host: str = "") -> None:
    """One GPU per process: the local index must name a GPU this node has."""
    if local_rank >= available:
        where = f" on {host}" if host else ""
        raise DeviceError(f"process {local_rank} of this node{where} needs GPU {local_rank}, "
                          f"but torch sees only {available} GPU(s) there",
                          f"start at most {available} processes per node (torchrun --nproc-per-node {available}) "
                          "and check CUDA_VISIBLE_DEVICES")


def init_group(cluster: Cluster, backend: str, timeout_s: float) -> None:
    """Join the process group (MASTER_ADDR/MASTER_PORT come from torchrun or the batch script)."""
    import torch.distributed as dist

    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ParameterError(f"{' and '.join(missing)} not set: rank {cluster.rank} cannot find rank 0",
                             "launch through torchrun, or export MASTER_ADDR=<first node> MASTER_PORT=29500 "
                             "before srun (scripts/slurm_multinode.sbatch does)")
    dist.init_process_group(backend, rank=cluster.rank, world_size=cluster.world_size,
                            timeout=timedelta(seconds=timeout_s))


# ---------------------------------------------------------------- messages

def _wait(work, timeout_s: float, peer: int, what: str) -> None:
    """Wait for one point-to-point transfer; a dead or silent peer becomes RankLost instead of a hang."""
    try:
        if work.wait(timedelta(seconds=timeout_s)) is not False:  # NCCL may answer a timeout with False
            return
        reason = "timed out"
    except RuntimeError as exc:  # gloo: the peer closed its sockets, or the deadline passed
        reason = _transport_reason(exc)
    timed_out = "timed out" in reason.lower() or "timeout" in reason.lower()
    problem = (f"rank {peer} was silent for {timeout_s:.0f} s while {what}" if timed_out
               else f"rank {peer} stopped answering while {what}: the process is gone ({reason})")
    raise RankLost(problem, "read that rank's own output above (out of memory? killed?) and run again; "
                            "for slow batches raise --timeout-s")


def _transport_reason(exc: BaseException) -> str:
    """gloo's error without its source location and boilerplate, e.g. 'Connection closed by peer [10.0.0.2]:4242'."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". This is typically")[0].rstrip(".")


def send_message(message: dict, peer: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """A JSON message as two CPU tensors (length, bytes): gloo carries them in every backend setup."""
    import torch
    import torch.distributed as dist

    data = json.dumps(message).encode()
    for tensor in (torch.tensor([len(data)], dtype=torch.int64), torch.frombuffer(bytearray(data), dtype=torch.uint8)):
        try:
            work = dist.isend(tensor, peer)
        except RuntimeError as exc:
            raise RankLost(f"rank {peer} cannot be reached ({_transport_reason(exc)})",
                           "read that rank's own output above and run again") from None
        _wait(work, timeout_s, peer, f"taking a {message.get('op')!r} message")


def receive_message(peer: int, timeout_s: float, what: str) -> dict:
    """The next JSON message from ``peer``, or RankLost after ``timeout_s`` / when the peer dies."""
    import torch
    import torch.distributed as dist

    size = torch.zeros(1, dtype=torch.int64)
    _wait(dist.irecv(size, peer), timeout_s, peer, what)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    _wait(dist.irecv(data, peer), timeout_s, peer, what)
    return json.loads(data.numpy().tobytes())


def send_images(images: np.ndarray, peer: int, device: str, timeout_s: float) -> None:
    """The batch's uint8 images as one tensor; on GPUs through NCCL from this rank's GPU."""
    import torch
    import torch.distributed as dist

    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
    if device.startswith("cuda"):
        tensor = tensor.to(device)
    _wait(dist.isend(tensor, peer), timeout_s, peer, "taking images")


def receive_images(shape: tuple[int, ...], peer: int, device: str, timeout_s: float) -> np.ndarray:
    """Images announced by an 'images' message; NCCL transfers are started only once the sender is ready."""
    import torch
    import torch.distributed as dist

    buffer = torch.empty(shape, dtype=torch.uint8, device=device)
    _wait(dist.irecv(buffer, peer), timeout_s, peer, "sending images")
    return buffer.cpu().numpy()


# ---------------------------------------------------------------- generators

def _is_warmup(prompts: list[str]) -> bool:
    return all(p == C.WARMUP_PROMPT for p in prompts)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def is_oom(exc: BaseException | None) -> bool:
    """Out of GPU (or host) memory anywhere in the exception chain, also when it happened on another rank."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "oom", False) or type(exc).__name__ == "OutOfMemoryError":
            return True
        text = str(exc).lower()
        if isinstance(exc, RuntimeError) and ("out of memory" in text or "not enough memory" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def peak_memory(device: str) -> int | None:
    """torch's peak allocated GPU memory of this process on ``device``; None on the CPU."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated(torch.device(device)))


class LocalReplica:
    """This rank's own pipeline, counting the benchmark batches it serves (warm-up excluded)."""

    def __init__(self, runner, device: str):
        self.runner, self.device = runner, device
        self.batches = self.samples = 0

    @property
    def response_shape(self) -> tuple[int, int, int]:
        return tuple(self.runner.response_shape)

    def generate(self, prompts: list[str]) -> np.ndarray:
        if STOP.is_set():
            raise KitError("rank 0 received SIGTERM (torchrun stops every rank when one fails, or the job was "
                           "cancelled): no new batches are started", "read the other ranks' messages above")
        images = self.runner.generate(prompts)
        if not _is_warmup(prompts):
            self.batches, self.samples = self.batches + 1, self.samples + len(prompts)
        return images


class RemoteReplica:
    """Stands in rank 0 for the replica of rank ``rank``: sends the prompts, returns that rank's images."""

    def __init__(self, rank: int, device: str, timeout_s: float):
        self.rank, self.device, self.timeout_s = rank, device, timeout_s
        self.info: dict = {}
        self.batches = self.samples = 0
        self.alive = True

    @property
    def response_shape(self) -> tuple[int, int, int]:
        return tuple(self.info["response_shape"])

    def handshake(self) -> dict:
        """Wait for the rank's 'hello' (it has loaded its model) and keep what it reports."""
        reply = self._receive("loading its model")
        if reply["op"] == "error":
            raise RankError(f"rank {self.rank} ({reply.get('host', '?')}) could not start: {reply['error']}",
                            reply.get("fix") or "fix that rank's problem and run again")
        self.info = reply
        return reply

    def generate(self, prompts: list[str]) -> np.ndarray:
        if STOP.is_set():
            raise KitError("rank 0 received SIGTERM: no new batches are started", "read the messages above")
        self._send({"op": "work", "prompts": prompts})
        reply = self._receive(f"generating a batch of {len(prompts)}")
        if reply["op"] == "error":
            raise RankError(f"rank {self.rank} failed on a batch of {len(prompts)}: {reply['error']}",
                            "for out-of-memory errors lower --batch-size", oom=bool(reply.get("oom")))
        images = receive_images(tuple(reply["shape"]), self.rank, self.device, self.timeout_s)
        if not _is_warmup(prompts):
            self.batches, self.samples = self.batches + 1, self.samples + len(prompts)
        return images

    def stop(self) -> dict:
        """Tell the rank to exit and return its statistics; best effort (a lost rank answers nothing)."""
        if not self.alive:
            return {}
        try:
            self._send({"op": "stop"}, STOP_TIMEOUT_S)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while (left := deadline - time.monotonic()) > 0:
                reply = receive_message(self.rank, left, "stopping")
                if reply["op"] == "stats":
                    return reply
        except KitError:
            self.alive = False
        return {}

    def _send(self, message: dict, timeout_s: float | None = None) -> None:
        try:
            send_message(message, self.rank, timeout_s or self.timeout_s)
        except RankLost:
            self.alive = False
            raise

    def _receive(self, what: str) -> dict:
        try:
            return receive_message(self.rank, self.timeout_s, what)
        except RankLost:
            self.alive = False
            raise


# ---------------------------------------------------------------- ranks

def _rank_info(cluster: Cluster, device: str, runner=None, load_seconds: float = 0.0) -> dict:
    """What rank 0 records about a rank: host, GPU and how long the model took to load."""
    import torch

    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    info = {"rank": cluster.rank, "host": socket.gethostname(), "local_rank": cluster.local_rank,
            "device": device, "gpu_name": gpu, "load_seconds": round(load_seconds, 2)}
    if runner is not None:
        info["response_shape"] = list(runner.response_shape)
    return info


def bind_device(config: RunConfig, cluster: Cluster) -> str:
    """This rank's device: cuda:<local rank> (one GPU per process) or cpu."""
    import torch

    from .pipeline import resolve_device

    if resolve_device(config.device, config.model_source) != "cuda":
        return "cpu"
    index = gpu_index(cluster, torch.cuda.device_count(), socket.gethostname())
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def ensure_tokenizer_files(cache_dir: Path) -> Path:
    """Write the CLIP tokenizer files by atomic rename: ranks that start together never read a half-written file."""
    import shutil
    import tempfile

    from .pipeline import clip_tokenizer_files

    target = Path(cache_dir) / "clip-bpe"
    if (target / "vocab.json").is_file() and (target / "merges.txt").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".clip-bpe-", dir=target.parent))
    try:
        clip_tokenizer_files(scratch)
        for name in ("vocab.json", "merges.txt"):
            os.replace(scratch / name, target / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def load_runner(config: RunConfig):
    """This process's pipeline, loaded as the harness loads it (same cache directory, same options)."""
    from .pipeline import make_runner

    cache = Path(config.output_dir).expanduser() / "cache"
    if config.model_source in ("synthetic", "tiny"):
        ensure_tokenizer_files(cache)
    options = {"optimizations": config.optimizations} if getattr(config, "optimizations", "") else {}
    runner = make_runner(config.model_source, config.dtype, config.device, config.model_path or None,
                         cache_dir=str(cache), **options)
    plan_batch_shapes(runner, config.batch_size, len(sample_set(config.variant)))
    return runner


def serve(cluster: Cluster, config: RunConfig, timeout_s: float, fail_after_batches: int = 0) -> int:
    """A rank > 0: load the model, then generate every batch rank 0 sends until it says stop."""
    started = time.perf_counter()
    try:
        device = bind_device(config, cluster)
        runner = load_runner(config)
    except KitError as exc:
        send_message({"op": "error", "host": socket.gethostname(), "error": exc.problem, "fix": exc.fix}, 0, timeout_s)
        _await_stop(timeout_s)
        return EXIT_KIT_ERROR
    send_message({"op": "hello", **_rank_info(cluster, device, runner, time.perf_counter() - started)}, 0, timeout_s)
    served = 0
    while True:
        message = receive_message(0, timeout_s, "waiting for work")
        if message["op"] == "stop":
            send_message({"op": "stats", "peak_memory_bytes": peak_memory(device), "batches": served}, 0, timeout_s)
            return 0
        if fail_after_batches and served >= fail_after_batches:
            print(f"sccsdxl: rank {cluster.rank}: exiting on purpose after {served} batches (--fail-after-batches)",
                  file=sys.stderr, flush=True)
            os._exit(3)  # a crash, as far as the other ranks can tell
        served += 0 if _is_warmup(message["prompts"]) else 1
        _serve_batch(runner, message["prompts"], device, timeout_s)


def _serve_batch(runner, prompts: list[str], device: str, timeout_s: float) -> None:
    """Generate one batch and answer rank 0; a model error is reported, the rank stays up."""
    failure = None
    try:
        images = runner.generate(prompts)
    except Exception as exc:  # noqa: BLE001 - rank 0 decides; the message says what happened here
        failure = {"op": "error", "error": _error_text(exc), "oom": is_oom(exc)}
    if failure is not None:  # outside the except block, so that the failed batch's tensors can be freed
        free_gpu_memory()
        send_message(failure, 0, timeout_s)
        return
    send_message({"op": "images", "shape": list(images.shape)}, 0, timeout_s)
    send_images(images, 0, device, timeout_s)


def _await_stop(timeout_s: float) -> None:
    """After a failed start, wait for rank 0's stop so that it reads our error before we go."""
    try:
        while receive_message(0, timeout_s, "waiting for stop")["op"] != "stop":
            pass
    except KitError:
        pass


def _annotate(run_dir: Path, extra: dict) -> dict:
    """Add the multi-process facts to a run's run.json (also after a failed run)."""
    path = run_dir / RUN_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(extra)
    write_json(path, record)
    return record


def run_main(config: RunConfig, modes: tuple[str, ...], cluster: Cluster, backend: str | None, timeout_s: float,
             show_progress: bool = True, label: str | None = None) -> tuple[BenchmarkRun, dict]:
    """Rank 0 (or the only process): load the local replica, meet every other rank, run loadgen over all of them,
    and record per-rank facts in run.json."""
    remotes = [RemoteReplica(rank, "cpu", timeout_s) for rank in range(1, cluster.world_size)]
    facts = {"world_size": cluster.world_size, "launcher": cluster.launcher, "backend": backend, "timeout_s": timeout_s}
    before = list_run_dirs(config.output_dir)
    local, infos = None, []
    try:
        started = time.perf_counter()
        device = bind_device(config, cluster)
        runner = load_runner(config)
        local = LocalReplica(runner, device)
        infos.append(_rank_info(cluster, device, runner, time.perf_counter() - started))
        for remote in remotes:
            remote.device = device  # images arrive on rank 0's GPU (NCCL) or in its memory (gloo)
            infos.append(remote.handshake())
        _check_shapes(local, remotes)
        run = run_benchmark(config, modes, generator=[local, *remotes], show_progress=show_progress,
                            label=label or default_label(config, cluster.world_size))
    except BaseException as exc:
        facts["ranks"] = _rank_table(infos, local, remotes, [remote.stop() for remote in remotes])
        for run_dir in sorted(list_run_dirs(config.output_dir) - before):
            _annotate(run_dir, {"status": "failed", "error": getattr(exc, "message", _error_text(exc)),
                                "distributed": facts})
        raise
    facts["ranks"] = _rank_table(infos, local, remotes, [remote.stop() for remote in remotes])
    facts["nodes"] = sorted({info["host"] for info in infos})
    run.record.update({"status": "complete", "distributed": facts,
                       "model": {**runner.info, "load_seconds": infos[0]["load_seconds"]}})
    write_json(run.run_dir / RUN_FILE, run.record)
    return run, facts


def default_label(config: RunConfig, world_size: int) -> str:
    """Run directory suffix: what ran, and on how many processes."""
    return f"{config.variant}-{config.model_source}-{config.dtype}-bs{config.batch_size}-x{world_size}"


def _check_shapes(local: LocalReplica, remotes: list[RemoteReplica]) -> None:
    odd = [r.rank for r in remotes if r.response_shape != local.response_shape]
    if odd:
        raise KitError(f"ranks {odd} produce images of another shape than rank 0 {local.response_shape}",
                       "start every rank with the same --model-source and --dtype")


def _rank_table(infos: list[dict], local: LocalReplica | None, remotes: list[RemoteReplica],
                stats: list[dict]) -> list[dict]:
    """One row per rank that started: where it ran, its GPU, and the benchmark batches it served."""
    rows = []
    for info in infos:
        rank = info["rank"]
        row = {k: v for k, v in info.items() if k not in ("op", "response_shape")}
        if rank == 0 and local is not None:
            row.update(batches=local.batches, samples=local.samples, peak_memory_bytes=peak_memory(local.device))
        else:
            remote, stat = remotes[rank - 1], stats[rank - 1] if rank - 1 < len(stats) else {}
            row.update(batches=remote.batches, samples=remote.samples,
                       peak_memory_bytes=stat.get("peak_memory_bytes"), answered_stop=bool(stat))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- command line

def load_params_file(path: str) -> dict[str, Any]:
    """RunConfig values from a notebook parameter file (-f tuned.yaml); other notebooks' names are skipped."""
    import yaml

    from .params import PARAMETER_TYPES

    try:
        values = yaml.safe_load(Path(path).expanduser().read_text()) or {}
    except OSError as exc:
        raise ParameterError(f"cannot read parameter file {path}: {exc.strerror}",
                             "pass an existing YAML file with -f") from None
    if not isinstance(values, dict):
        raise ParameterError(f"{path} is not a YAML mapping of parameter names to values",
                             "write one 'name: value' per line")
    unknown = sorted(k for k in values if k not in PARAMETER_TYPES)
    if unknown:
        raise ParameterError(f"unknown parameter(s) {', '.join(unknown)} in {path}",
                             f"use the kit's parameter names: {', '.join(sorted(PARAMETER_TYPES))}")
    names = {f.name for f in fields(RunConfig)} | {"show_progress"}
    return {k: v for k, v in values.items() if k in names}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sccsdxl.distributed",
        description="One benchmark run over several processes (one per GPU): launch with torchrun or srun.",
        epilog="example: torchrun --nproc-per-node 4 -m sccsdxl.distributed --variant main --model-source hf "
               "--dtype fp16 --batch-size 8")
    parser.add_argument("-f", "--params-file", default=None,
                        help="YAML parameter file (e.g. <output_dir>/tuned.yaml); flags win")
    defaults = RunConfig()
    for field in fields(RunConfig):
        default = getattr(defaults, field.name)
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(default), default=default,
                            help=f"default: {default!r}")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of performance,accuracy")
    parser.add_argument("--label", default=None, help="suffix of the run directory name")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="auto: NCCL for images between GPUs (gloo for control), gloo on the CPU")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                        help="longest wait for another rank before the run stops (default %(default)s)")
    parser.add_argument("--no-progress", dest="show_progress", action="store_false", help="no progress bar")
    parser.add_argument("--result-file", default=None, help="rank 0 writes a JSON summary here (used by the sweep)")
    # fault injection for the tests: ranks > 0 exit abruptly after this many batches
    parser.add_argument("--fail-after-batches", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with defaults taken from -f FILE first."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.params_file:
        parser.set_defaults(**load_params_file(first.params_file))
    return parser.parse_args(argv)


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        raise ParameterError(f"--modes {text!r} is not a subset of {','.join(MODES)}",
                             "pass e.g. --modes performance,accuracy")
    return modes


def _on_sigterm(signum, frame) -> None:
    """Let loadgen finish what is in flight, so that the run ends with a message instead of a silent kill."""
    STOP.set()
    print("sccsdxl: rank 0 received SIGTERM (torchrun stops every rank when one fails, or the job was cancelled); "
          "stopping after the batches in flight", file=sys.stderr, flush=True)


def _write_result(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(path), payload)


def _summary(run: BenchmarkRun, facts: dict) -> dict:
    peaks = [r.get("peak_memory_bytes") for r in facts.get("ranks", []) if r.get("peak_memory_bytes")]
    return {"ok": True, "run_dir": str(run.run_dir), "results": run.record["results"], "distributed": facts,
            "peak_memory_bytes": max(peaks) if peaks else None, "error": None, "oom": False}


def _print_report(run: BenchmarkRun, facts: dict) -> None:
    print(results_table(run).to_string())
    for row in facts["ranks"]:
        print(f"rank {row['rank']}: {row['host']} {row['device']} ({row['gpu_name']}): "
              f"{row['batches']} batches, {row['samples']} samples")
    print(f"run directory: {run.run_dir}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of every rank; rank 0 prints the results and writes the run directory."""
    cluster, args, before = Cluster(), None, None
    try:
        args = parse_args(argv)
        cluster = cluster_from_env()
        config = RunConfig(**{f.name: getattr(args, f.name) for f in fields(RunConfig)}).validate()
        modes = _modes(args.modes)
        before = list_run_dirs(config.output_dir)
        if cluster.is_main:
            signal.signal(signal.SIGTERM, _on_sigterm)
        backend = None
        if cluster.world_size > 1:
            from .pipeline import resolve_device

            backend = resolve_backend(args.backend, resolve_device(config.device, config.model_source))
            init_group(cluster, backend, args.timeout_s)
            if not cluster.is_main:
                return _finish(serve(cluster, config, args.timeout_s, args.fail_after_batches))
        run, facts = run_main(config, modes, cluster, backend, args.timeout_s, args.show_progress, args.label)
    except KitError as exc:
        return _fail(cluster, args, before, exc.message, is_oom(exc))
    except Exception as exc:
        if not is_oom(exc):
            raise
        oom = KitError(f"out of memory at batch size {args.batch_size}: {_error_text(exc)}",
                       "lower --batch-size (03_batch_size_sweep finds the largest that fits)")
        return _fail(cluster, args, before, oom.message, True)
    _write_result(args.result_file, _summary(run, facts))
    _print_report(run, facts)
    return _finish(0)


def _fail(cluster: Cluster, args: argparse.Namespace | None, before: set[Path] | None, message: str, oom: bool) -> int:
    """Print the message; rank 0 also writes the result file and says where the partial run is."""
    print(f"sccsdxl: rank {cluster.rank}: {message}", file=sys.stderr, flush=True)
    if cluster.is_main and args is not None:
        made = sorted(list_run_dirs(args.output_dir) - before) if before is not None else []
        _write_result(args.result_file, {"ok": False, "error": message, "oom": oom,
                                         "run_dir": str(made[-1]) if made else None})
        if made:
            print(f"sccsdxl: what the run wrote so far is kept in {made[-1]}", file=sys.stderr, flush=True)
    return _finish(EXIT_KIT_ERROR, failed=True)


def _finish(code: int, failed: bool = False) -> int:
    """Leave the process group; after a failure exit at once (a lost peer can make a clean teardown hang)."""
    import torch.distributed as dist

    if failed and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
