"""How many workers and actors a job starts, and what each reserves, from the cluster's resources.

An actor pool or set of training workers that takes every CPU starves Ray Data's read,
decode and write tasks and the job hangs ("3/2 CPU"); these planners always leave room for
them. Logical CPUs are scheduling tokens here; each worker's torch thread count decides its
real use of the cores.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from dataclasses import dataclass
from typing import Any

from pipeline.errors import InputError

# Images per model call. On CPUs, batches of 256 64x64 images ran at ~550 img/s against ~900
# at 128: the larger activations go to fresh mmap'd memory on every call, and the kernel's
# page faults took as much time as the convolutions (bench: docs/BENCHMARKS.md). Inference
# processes now keep freed memory (`keep_freed_memory`, below), so that reason is gone; 128 stays:
# with it, a one-off probe found batches of 256 no faster on one thread (*unrecorded note*). GPUs want
# large batches (throughput still rose from 1,024 to 4,096 on an H200).
CPU_BATCH_SIZE = 128
GPU_BATCH_SIZE = 1024
# Above this side, images per call shrink with the images' area (a tiled model's working size):
# a decoded batch then holds about as many pixels as a default batch of BATCH_SIDE px images.
BATCH_SIDE = 128
# Torch threads of each CPU model actor: a single-threaded actor per CPU. Its convolutions are
# small (a batch of 64 px images), and a thread team waits at every layer for its slowest member,
# which the job's decode and write tasks and Ray's own processes keep preempting: on 2 cores two
# one-thread actors embedded 20,000 images in 29.3 s against 44.1 s for one two-thread actor
# (medians, the same run of bench/embed_throughput.py --pool 1x2; docs/BENCHMARKS.md).
MODEL_THREADS_PER_ACTOR = 1
# The least object-store memory an inference job's blocks in flight may fill (object_store_budget).
MIN_OBJECT_STORE_BUDGET = 256 * 2**20

# glibc's malloc hands large freed blocks back to the kernel: blocks over its mmap threshold are
# unmapped, the main heap's top is trimmed past its trim threshold, and a thread's heap (Ray
# Data runs an actor's batches on a pool thread) is unmapped whole once nothing in it is used.
# A model in inference frees and allocates the same activations for every batch, so each batch
# page-faulted them in again. An inference process (`keep_freed_memory`) raises both thresholds
# and pads each heap by a thread heap's largest size (64 MiB), so that freed blocks stay in the
# process for the next batch; they stay at their peak rather than shrink back (the embed job's
# peak: docs/BENCHMARKS.md "Freed memory kept in the process"). Training showed no gain in a
# one-off probe (*unrecorded note*), and is left as it was.
# bench/embed_throughput.py --malloc-defaults times the job and the bare loop with and without it.
KEEP_FREED_BYTES = 1 << 30
HEAP_PAD_BYTES = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit: no thread heap is then ever wholly free
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
KEEP_FREED_ENV = "SQUEEZE_KEEP_FREED_MEMORY"  # "0" leaves glibc's malloc as it is


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to KEEP_FREED_BYTES, and its heaps, for reuse
    instead of returning them to the kernel; once per process. False where the C library is not
    glibc (or an older one rejects a setting) or KEEP_FREED_ENV is "0"."""
    if os.environ.get(KEEP_FREED_ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        getattr(libc, "gnu_get_libc_version")
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
                and libc.mallopt(_M_TOP_PAD, HEAP_PAD_BYTES))


@dataclass(frozen=True)
class ResourcePlan:
    """An inference job's model actors and the size of its other tasks."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    torch_threads: int
    task_cpus: float  # logical CPUs of each read, decode and write task
    batch_size: int  # images per model call


def pool_setting_problems(batch_size: int | None, actors: int | None, torch_threads: int | None,
                          rows_per_file: int) -> list[str]:
    """What is wrong with an inference job's pool settings (None: decided at run time)."""
    named = {"batch_size": batch_size, "actors": actors, "torch_threads": torch_threads, "rows_per_file": rows_per_file}
    return [f"{name} must be at least 1, got {value}" for name, value in named.items()
            if value is not None and value < 1]


def plan_actor_pool(resources: dict[str, float], resuming: bool, actors: int | None = None,
                    gpu: bool | None = None, torch_threads: int | None = None,
                    batch_size: int | None = None, node_cpus: float | None = None,
                    input_size: int = 0, threads_per_actor: int = MODEL_THREADS_PER_ACTOR) -> ResourcePlan:
    """The actor pool of an inference job (embed, decode, a model's calibration; neighbours'
    search) and its task sizes.

    On CPUs there is an actor per `threads_per_actor` CPUs (at least one), each with that many
    threads: between them the threads follow the cores. The actors leave room for one read and
    one write task at all times, on some node, and on a resumed run for the checkpoint filter,
    an actor of Ray Data's own that holds a whole CPU. On a 2-CPU machine a resumed run gives
    the model actor no logical CPU at all and it still computes on both cores. `node_cpus`, the CPUs of the
    cluster's largest node (`largest_node_cpus`), caps what one actor asks for: an actor bigger
    than every node would wait for ever (a cluster of 2-CPU nodes has 5 CPUs in all, but no node
    with 4). `input_size`, the side images are decoded to, shrinks the default batch for large
    images (BATCH_SIDE).
    """
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    task_cpus = 0.5 if cpus <= 4 else 1.0
    available = cpus - (1.0 if resuming else 0.0)  # the checkpoint filter
    if available < 2 * task_cpus:
        raise InputError(
            f"resuming needs a cluster of at least {1 + 2 * task_cpus:g} CPUs (Ray Data's checkpoint filter "
            f"holds a whole CPU, reading and writing {2 * task_cpus:g}); this one has {cpus:g}")
    use_gpu = gpus >= 1 if gpu is None else gpu
    if use_gpu:
        # Autoscaling GPU workers may not be up yet: at least one actor, placed when they are.
        actors = actors or max(1, int(gpus))
        return ResourcePlan(actors, 0.0, 1.0, torch_threads or 4, task_cpus,
                            batch_size or _default_batch(GPU_BATCH_SIZE, input_size))
    # Actors ask for whole multiples of a task's CPUs, so that every node's free CPUs are too and
    # the room left for reading and writing takes whole tasks wherever it lies: 0.6-CPU actors on
    # nodes of 1, 2 and 2 CPUs left 0.2-0.4 free on each and no node could run a 1-CPU read task.
    units = int((available - 2 * task_cpus) // task_cpus)  # task-sized shares left for the actors
    actors = actors or max(1, min(int(available // threads_per_actor), units))
    threads = torch_threads or max(1, int(min(cpus // actors, node_cpus or math.inf)))
    per_actor = min(units // actors * task_cpus, 4.0, float(max(threads, threads_per_actor)), node_cpus or math.inf)
    return ResourcePlan(actors, per_actor, 0.0, threads, task_cpus,
                        batch_size or _default_batch(CPU_BATCH_SIZE, input_size))


def _default_batch(default: int, input_size: int) -> int:
    """Images per call: `default`, or as many as hold the same pixels when images are larger than BATCH_SIDE."""
    if input_size <= BATCH_SIDE:
        return default
    return max(1, default * BATCH_SIDE**2 // input_size**2)


def input_size(model_config: dict[str, Any]) -> int:
    """The side a checkpoint's images are decoded to (`AutoencoderConfig.input_size`), from its config dict."""
    return model_config.get("working_size") or model_config["image_size"]


def largest_node_cpus() -> float | None:
    """The logical CPUs of the connected cluster's largest live node (None when it reports none)."""
    import ray

    cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
    return max(cpus) if cpus else None


def object_store_budget(plan: ResourcePlan, model_config: dict[str, Any]) -> int:
    """Bytes of object store an inference job's blocks in flight may fill: 16 decoded batches
    per actor, at least MIN_OBJECT_STORE_BUDGET.

    Reading and decoding run far faster than the model on a CPU. Left to Ray Data's default
    budget (a share of the whole object store), decoded blocks piled up ahead of the actors
    for as long as the job ran: the peak memory of 100,000 images was 1.34x that of 20,000.
    Bounded, it is 1.14x, at the same speed (docs/BENCHMARKS.md).
    """
    image_bytes = input_size(model_config) ** 2 * model_config["channels"]
    return max(MIN_OBJECT_STORE_BUDGET, plan.actors * 16 * plan.batch_size * image_bytes)


def plan_training_workers(workers: int, cluster_cpus: float, gpu: bool,
                          cpus_per_worker: float | None = None) -> tuple[float, int]:
    """CPUs reserved per Ray Train worker, and its torch threads.

    On CPU-only clusters one CPU is left to the data pipeline's decode tasks.
    """
    if cpus_per_worker is not None:
        cpus = cpus_per_worker
    elif gpu:
        cpus = 1.0
    else:
        cpus = max(cluster_cpus - 1.0, 0.5 * workers) / workers
        cpus = math.floor(cpus * 4) / 4  # quarter-CPU steps keep the numbers readable
    # Threads follow the cores each worker really has, not its reservation: the decode tasks
    # are light beside the model, and a lone worker on a 2-core machine should use both.
    threads = 2 if gpu else max(1, int(cluster_cpus // workers))
    return cpus, threads
