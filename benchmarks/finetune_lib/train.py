"""Training, evaluation and measurements for one variant; the step-by-step equivalence check.

What a training step is timed as: moving the padded batch to the device, forward, loss, backward,
gradient clipping and the optimizer step, with the device synchronised at both ends (wall clock).
Building the batch on the host is not timed (a DataLoader would do it in the background).
The first ``warmup_steps`` steps and the profiled steps are not timed. On a GPU, one batch of
each kind the training will see is run forward and backward before it, untimed
(:func:`warm_up_kernels`), so that no kernel compiles or autotunes inside a timed step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import common  # benchmarks/common.py: finetune.py and the tests put benchmarks/ on sys.path

from . import data as data_lib
from . import models
from .report import progress

# Relative tolerances on the loss, step by step, with dropout 0 (DESIGN.md's attention forward
# tolerances: attention is the loosest op of the chain), and on the first step's logits and each
# parameter's gradient (its attention forward and gradient tolerances).
LOSS_TOLERANCE = {"fp32": 2e-3, "bf16": 2.5e-2}
GRAD_TOLERANCE = {"fp32": 4e-3, "bf16": 5e-2}


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 64
    eval_batch_size: int = 128
    lr: float = 1e-4
    optimizer: str = "adam"          # "adam" or "adamw"
    weight_decay: float = 0.0
    schedule: str = "constant"       # "constant" or "linear" (warm-up, then linear decay to 0)
    warmup_fraction: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    bucketing: bool = True
    precision: str = "fp32"          # "fp32" (TF32 matmuls on GPUs) or "bf16" (autocast)
    warmup_steps: int = 5            # not timed
    profile_steps: int = 3           # profiled with torch.profiler after the warm-up (0: none)
    max_steps: int | None = None     # stop each variant after this many steps (the schedule spans them)
    evaluate: bool = True
    progress: bool = True
    backend: str | None = None       # force a fastformer backend (None: automatic)
    compile: bool = False            # train both variants under torch.compile (evaluation stays eager)
    compile_backend: str = "inductor"
    compile_mode: str | None = None  # torch.compile's mode (inductor only); None: its default


# --------------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; one process: rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """All-reduce a list of numbers across ranks (sum or max); as is with one process."""
        if not self.enabled or not values:
            return list(values)
        import torch.distributed as dist

        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor.cpu().tolist()

    def broadcast(self, obj):
        """rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device_arg: str | None) -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun (NCCL on GPUs, gloo on the CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        if world_size > 1 and local_rank >= torch.cuda.device_count():
            gpus = torch.cuda.device_count()
            raise ValueError(f"process {rank} (LOCAL_RANK {local_rank}) has no GPU of its own: this machine has "
                             f"{gpus} CUDA device(s); start at most {gpus} processes a node "
                             f"(torchrun --nproc_per_node {gpus}), or pass --device cpu to train on CPUs (gloo)")
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
    return Dist(rank, world_size, local_rank), device


def shutdown_distributed(dist_info: Dist) -> None:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Op categories by name (lower case): kernel names on GPUs (PyTorch's and fastformer's Triton/CUDA
# kernels), operator and autograd-node names on the CPU. Checked in this order.
CATEGORIES = (
    ("attention", ("attention", "attn", "flash", "fmha", "sdpa", "softmax")),
    ("layer_norm", ("layer_norm", "layernorm", "residual_norm", "residualnorm", "rms_norm", "gammabeta")),
    ("gelu", ("gelu",)),
)
SHARE_KEYS = ("attention", "layer_norm", "gelu", "rest")


def categorize(name: str) -> str | None:
    name = name.lower()
    if "log_softmax" in name or "logsoftmax" in name:  # the loss's, not attention's
        return None
    for category, patterns in CATEGORIES:
        if any(p in name for p in patterns):
            return category
    return None


def _named_category(event) -> str | None:
    """The category of the innermost enclosing operator whose name says one."""
    while event is not None:
        category = categorize(event.name)
        if category is not None:
            return category
        event = event.cpu_parent
    return None


def _is_backward_node(event) -> bool:
    # The autograd engine records the forward thread and sequence number of the node it runs.
    return event.sequence_nr >= 0 and bool(getattr(event, "fwd_thread", 0))


class _Categorizer:
    """Categories of CPU operators: by their names and their enclosing operators' names, and for
    the backward, also by the forward operator that created the autograd node. A generic backward
    node (BmmBackward0, MulBackward0) then counts where its forward ran: the matmuls of a decomposed
    attention count as attention in the backward as in the forward.

    Link: a forward operator records the autograd sequence number current on its thread when it
    starts; the node it creates takes that number, so the last forward operator to start with
    number N on a thread is the one that created node N there (earlier ones created no node)."""

    def __init__(self, events):
        from torch.autograd import DeviceType

        creators = {}
        for event in events:
            if event.device_type == DeviceType.CPU and event.sequence_nr >= 0 and not _is_backward_node(event):
                key = (event.thread, event.sequence_nr)
                if key not in creators or event.time_range.start >= creators[key].time_range.start:
                    creators[key] = event
        self._forward = {key: _named_category(event) for key, event in creators.items()}

    def __call__(self, event) -> str:
        category = _named_category(event)
        while category is None and event is not None:
            if _is_backward_node(event):
                category = self._forward.get((event.fwd_thread, event.sequence_nr))
            event = event.cpu_parent
        return category or "rest"


def time_shares(events, device: torch.device) -> dict:
    """Share of attention / LayerNorm / GELU / the rest in the profiled steps.

    GPU: device time of every kernel, by the kernel's own name, else by the operators that launched
    it; not the device-side copies of record_function ranges (the profiler's ProfilerStep#N, the
    optimizer's), which span kernels and the gaps between them (PyTorch's own tables leave them
    out too). CPU: self time of every operator, by its own name or its enclosing operators' names
    (e.g. the matmuls inside ``aten::scaled_dot_product_attention`` count as attention).
    Backward operators with no telling name count where their forward operator did
    (``_Categorizer``), on both.
    """
    totals = dict.fromkeys(SHARE_KEYS, 0.0)
    from torch.autograd import DeviceType

    category_of = _Categorizer(events)

    if device.type == "cuda":
        linked = {}
        for event in events:
            if event.device_type == DeviceType.CPU:
                for kernel in getattr(event, "kernels", ()):
                    if event.is_user_annotation and kernel.name == event.name:
                        continue  # the range's own device-side copy
                    category = categorize(kernel.name) or category_of(event)
                    totals[category] += kernel.duration
                    linked[(kernel.name, kernel.duration)] = linked.get((kernel.name, kernel.duration), 0) + 1
        for event in events:  # kernels the profiler could not link to an operator
            if event.device_type != DeviceType.CPU and not event.is_user_annotation:
                duration = event.time_range.end - event.time_range.start
                key = (event.name, duration)
                if linked.get(key, 0) > 0:
                    linked[key] -= 1
                else:
                    totals[categorize(event.name) or "rest"] += duration
        clock = "device time of the GPU kernels"
    else:
        for event in events:
            if event.device_type == DeviceType.CPU and not event.is_async:
                totals[category_of(event)] += event.self_cpu_time_total
        clock = "self CPU time of the operators"
    total = sum(totals.values())
    shares = {key: (value / total if total > 0 else math.nan) for key, value in totals.items()}
    return {"shares": shares, "profiled_ms": total / 1e3, "clock": clock}


@contextlib.contextmanager
def record_backends():
    """Which fastformer backend each op call went to: yields {op: {"calls": {backend: n},
    "first": explanation of the first call}} (filled while the block runs)."""
    from fastformer import dispatch

    seen: dict = {}
    original = dispatch.select_backend

    def spy(call, requested=None):
        selection = original(call, requested)
        entry = seen.setdefault(call.op, {"calls": {}, "first": str(selection)})
        entry["calls"][selection.backend] = entry["calls"].get(selection.backend, 0) + 1
        return selection

    dispatch.select_backend = spy
    try:
        yield seen
    finally:
        dispatch.select_backend = original


def _profiler(device: torch.device, steps: int):
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1))


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _optimizer(model: nn.Module, config: TrainConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if config.schedule != "linear":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def compiled(model: nn.Module, config: TrainConfig) -> nn.Module:
    """``model`` under ``torch.compile`` when ``config.compile`` (the same options for both
    variants), else ``model`` itself. Shapes are dynamic from the start: length-bucketed batches
    change the sequence length at every bucket, and a first static compile would be thrown away.
    In the fastformer variant each fastformer op is one opaque node of the graph (its backend
    chosen at trace time); in the torch variant the compiler fuses the residual adds, dropouts,
    LayerNorms and GELUs itself: the comparison a user of torch.compile cares about."""
    if not config.compile:
        return model
    return torch.compile(model, backend=config.compile_backend, mode=config.compile_mode, dynamic=True)


def compile_options_problem(backend: str, mode: str | None) -> str | None:
    """What is wrong with torch.compile's ``backend`` and ``mode``, or None."""
    import torch._dynamo
    import torch._inductor

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        return (f"--compile-backend {backend!r} is not a torch.compile backend: "
                f"{', '.join(torch._dynamo.list_backends())} or a debugging one such as aot_eager")
    if mode is not None and backend != "inductor":
        return f"--compile-mode is inductor's; --compile-backend is {backend}"
    modes = torch._inductor.list_mode_options()
    if mode is not None and mode not in modes:
        return f"--compile-mode must be one of {', '.join(modes)}; got {mode!r}"
    return None


def _graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def evaluate(model: nn.Module, data: data_lib.Encoded, pad: int, batch_size: int, device: torch.device,
             precision: str, dist_info: Dist, show: bool, desc: str = "eval") -> dict:
    """Accuracy and mean loss on ``data`` (each rank its shard, reduced)."""
    model = getattr(model, "module", model)  # DistributedDataParallel: the local model
    was_training = model.training
    model.eval()
    batches = data_lib.shard(data_lib.eval_batches(data.lengths, batch_size), dist_info.rank,
                             dist_info.world_size, equal=False)
    correct = loss_sum = count = 0.0
    start = time.perf_counter()
    with torch.no_grad(), _autocast(device, precision):
        for indices in progress(batches, desc=desc, enabled=show, leave=False):
            ids, padding, labels = (t.to(device, non_blocking=True) for t in data_lib.collate(data, indices, pad))
            logits = model(ids, padding).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            count += len(indices)
    correct, loss_sum, count = dist_info.reduce([correct, loss_sum, count])
    model.train(was_training)
    return {"accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1), "reviews": int(count),
            "seconds": time.perf_counter() - start}


def _random_state_kept(device: torch.device):
    """PyTorch's random state (CPU, and ``device``'s on CUDA) restored on exit."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def warm_up_kind(lengths: list[int]) -> tuple:
    """What decides which kernels a batch of reviews of these lengths compiles and autotunes:
    Triton's autotuning key (the padded length's power-of-two bucket); Triton's specialisation of
    integer arguments divisible by 16, strides included (the padded length, and so the strides of
    (batch, length, features) activations, and the batch's token count, the rows of the norms and
    GELU: by the power of two, up to 16, dividing each); padded or not; and torch.compile's
    specialisation of sizes 0 and 1 (a batch of one review) and its duck sizing (sizes equal at
    the first compile share one symbol: a batch as many reviews as tokens long, or not)."""
    longest = max(lengths)
    return (1 << max(0, longest - 1).bit_length(), math.gcd(longest, 16), math.gcd(len(lengths) * longest, 16),
            min(lengths) < longest, len(lengths) == 1, len(lengths) == longest)


def warm_up_kernels(model: nn.Module, data: data_lib.Encoded, pad: int, config: TrainConfig,
                    device: torch.device) -> int:
    """Forward and backward, without an optimizer step and with the random state restored, on one
    batch of each kind (:func:`warm_up_kind`) the training will see; returns how many, so that no
    timed step compiles a kernel. The batches are those of every epoch, in the training's order
    (the same generator and seed), taken whole (not a rank's shard), so that every rank runs the
    same ones."""
    kinds = {}
    order = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        for indices in data_lib.make_batches(data.lengths, config.batch_size, order, config.bucketing):
            kinds.setdefault(warm_up_kind([data.lengths[i] for i in indices]), indices)
    with _random_state_kept(device):
        for indices in kinds.values():
            ids, padding, labels = (t.to(device) for t in data_lib.collate(data, indices, pad))
            with _autocast(device, config.precision):
                logits = model(ids, padding)
            F.cross_entropy(logits.float(), labels).backward()
            model.zero_grad(set_to_none=True)
    synchronize(device)
    return len(kinds)


def eager_backends(model: nn.Module, data: data_lib.Encoded, pad: int, config: TrainConfig,
                   device: torch.device) -> dict:
    """:func:`record_backends` of one eager forward (gradients on, random state restored) of the
    training's first batch: the backends torch.compile's trace picks, by the same rules. Under
    DistributedDataParallel, the local model's (DDP's forward prepares a gradient reduction that no
    backward would finish)."""
    order = torch.Generator().manual_seed(config.seed)
    indices = next(iter(data_lib.make_batches(data.lengths, config.batch_size, order, config.bucketing)))
    ids, padding, _ = (t.to(device) for t in data_lib.collate(data, indices, pad))
    with _random_state_kept(device), record_backends() as seen:
        with _autocast(device, config.precision):
            getattr(model, "module", model)(ids, padding)
    return dict(seen)


def _training(kernels: str, base: nn.Module, train_data: data_lib.Encoded, test_data: data_lib.Encoded,
              pad: int, config: TrainConfig, device: torch.device, dist_info: Dist,
              log: Callable[[str], None], measure_memory: bool):
    """Train a copy of ``base`` in the given variant, as a generator: yields after every training
    step whether this variant's profiler is recording (its next steps must then run without another
    variant's in between); returns the variant's measurements and results."""
    model = models.make_variant(base, kernels, config.backend).to(device)
    model.train()
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = compiled(model, config)  # what the training steps call; evaluation calls ``model``
    data_order = torch.Generator().manual_seed(config.seed)        # same batches for both variants
    torch.manual_seed(config.seed + 1 + dist_info.rank)              # dropout (and nothing else)
    steps_per_epoch = len(data_lib.shard(data_lib.make_batches(train_data.lengths, config.batch_size,
                                                               torch.Generator().manual_seed(0)),
                                         dist_info.rank, dist_info.world_size))
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer, scheduler = _optimizer(model, config, total_steps)
    # Under torch.compile the backends are chosen while tracing, where record_backends' stand-in
    # for dispatch would be traced too: they are recorded from one eager forward instead.
    backends = eager_backends(model, train_data, pad, config, device) if config.compile else {}
    # Untimed first: kernels compile and autotune (GPU), torch.compile traces and compiles (any device).
    warmed_up, warm_up_seconds = 0, 0.0
    if device.type == "cuda" or config.compile:
        start = time.perf_counter()
        warmed_up = warm_up_kernels(step_model, train_data, pad, config, device)
        warm_up_seconds = time.perf_counter() - start
    graphs_in_steps = 0  # compiled during this variant's own training steps (not its warm-up)
    measure_memory = measure_memory and device.type == "cuda"
    if measure_memory:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    # Profiled: one profiler warm-up step, then profile_steps steps, right after the timing warm-up.
    profile_from = config.warmup_steps
    profile_to = profile_from + 1 + config.profile_steps
    if config.profile_steps <= 0 or profile_to > total_steps:  # none asked, or too short a run
        profile_from = profile_to = -1
    profiler = shares = None
    profiled_seconds = 0.0
    if config.compile and device.type != "cuda":
        # On the CPU a compiled graph's generated code runs inside one profiler event: no op names.
        profile_from = profile_to = -1
        shares = {"note": "not measured: under torch.compile on the CPU the profiler cannot split a compiled "
                          "graph's time by op"}
    losses, step_ms, useful_tokens, all_tokens, epochs = [], [], [], [], []
    peak_bytes = 0
    show = config.progress and dist_info.main
    step = 0
    train_seconds = 0.0  # this variant's own time in the training loops (not another variant's)
    for epoch in range(config.epochs):
        batches = data_lib.shard(data_lib.make_batches(train_data.lengths, config.batch_size, data_order,
                                                       config.bucketing),
                                 dist_info.rank, dist_info.world_size)
        bar = progress(batches, desc=f"{kernels} epoch {epoch + 1}/{config.epochs}", enabled=show)
        resumed, first_loss = time.perf_counter(), len(losses)
        for indices in bar:
            if step >= total_steps:
                break
            ids, padding, labels = data_lib.collate(train_data, indices, pad)
            n_useful, n_all = int((~padding).sum()), padding.numel()
            if step == profile_from:
                try:
                    profiler = _profiler(device, config.profile_steps)
                    profiler.start()
                except Exception as error:  # e.g. no CUPTI: measure the rest anyway
                    profiler, shares = None, {"error": f"profiler: {type(error).__name__}: {error}"}
                    profile_from = profile_to = -1
            recorder = record_backends() if step == 0 and not config.compile else contextlib.nullcontext({})
            graphs_before = _graphs_compiled() if config.compile else 0
            synchronize(device)
            start = time.perf_counter()
            with recorder as seen:
                ids, padding, labels = (t.to(device, non_blocking=True) for t in (ids, padding, labels))
                with _autocast(device, config.precision):
                    logits = step_model(ids, padding)
                loss = F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
                optimizer.step()
                scheduler.step()
            synchronize(device)
            elapsed = time.perf_counter() - start
            compiled_now = _graphs_compiled() - graphs_before if config.compile else 0
            graphs_in_steps += compiled_now
            if step == 0 and not config.compile:
                backends = dict(seen)
            if profiler is not None:
                profiler.step()
            if profile_from < step < profile_to:  # the profiler's recorded steps
                profiled_seconds += elapsed
            if profiler is not None and step == profile_to - 1:
                profiler.stop()
                try:
                    shares = time_shares(profiler.events(), device)
                    if device.type == "cuda":
                        # Kernel time over the same steps' wall time: well under 1, the GPU waited on
                        # the host (the profiler's own host work lowers it a little).
                        shares["gpu_busy"] = shares["profiled_ms"] / (profiled_seconds * 1e3)
                except Exception as error:  # a measurement must never stop the training
                    shares = {"error": f"{type(error).__name__}: {error}"}
                profiler = None
            elif step >= config.warmup_steps and not profile_from <= step < profile_to and not compiled_now:
                # (a step that compiled a graph the warm-up did not foresee is left out of the timing)
                step_ms.append(elapsed * 1e3)
                useful_tokens.append(n_useful)
                all_tokens.append(n_all)
            losses.append(loss.item())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            step += 1
            train_seconds += time.perf_counter() - resumed
            yield profiler is not None
            resumed = time.perf_counter()
        if hasattr(bar, "close"):
            bar.close()
        train_seconds += time.perf_counter() - resumed
        if measure_memory:
            peak_bytes = max(peak_bytes, torch.cuda.max_memory_allocated(device))
        loss_sum, loss_count = dist_info.reduce([sum(losses[first_loss:]), len(losses) - first_loss])
        record = {"epoch": epoch + 1, "steps": step, "train_loss": loss_sum / loss_count if loss_count else math.nan}
        if config.evaluate:
            record["test"] = evaluate(model, test_data, pad, config.eval_batch_size, device, config.precision,
                                      dist_info, show, desc=f"{kernels} eval")
            if dist_info.main:
                log(f"{kernels}: epoch {epoch + 1}: train loss {record['train_loss']:.4f}, test accuracy "
                    f"{100 * record['test']['accuracy']:.2f}% (loss {record['test']['loss']:.4f})")
        epochs.append(record)
        if step >= total_steps:
            break
    if profiler is not None:  # the run ended inside the profiled window
        profiler.stop()

    if graphs_in_steps and dist_info.main:
        log(f"{kernels}: torch.compile compiled {graphs_in_steps} graph(s) during training steps (after the "
            f"warm-up): those steps are left out of the step times and tokens/s")
    result = {"kernels": kernels, "steps": step, "train_seconds": train_seconds, "epochs": epochs,
              "warm_up_batches": warmed_up, "warm_up_seconds": warm_up_seconds,
              "compile": {"backend": config.compile_backend, "mode": config.compile_mode,
                          "graphs_compiled_in_training_steps": graphs_in_steps} if config.compile else None,
              "optimize_report": models.optimize_report(getattr(model, "module", model)),
              "backends": backends}
    result.update(_reduce_measurements(losses, step_ms, useful_tokens, all_tokens, peak_bytes, dist_info))
    result["time_shares"] = shares
    if epochs and "test" in epochs[-1]:
        result["test_accuracy"] = epochs[-1]["test"]["accuracy"]
        result["test_loss"] = epochs[-1]["test"]["loss"]
    del model, optimizer
    return result


def _finish(steps) -> dict:
    """Runs a :func:`_training` generator to its end; returns its result."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


class _OwnRandomState:
    """Steps a :func:`_training` generator with a random state of its own (PyTorch's CPU and CUDA
    generators: dropout), swapped in around each step, so that interleaving variants changes
    nothing they draw."""

    def __init__(self, steps, device: torch.device):
        self.steps, self.device, self.state = steps, device, None

    def step(self) -> bool:
        cuda = self.device.type == "cuda"
        if self.state is not None:
            torch.set_rng_state(self.state[0])
            if cuda:
                torch.cuda.set_rng_state(self.state[1], self.device)
        try:
            return next(self.steps)
        finally:
            self.state = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None)


VARIANT_ORDERS = ("sequential", "alternate")


def train_variants(names: list[str], base: nn.Module, train_data: data_lib.Encoded, test_data: data_lib.Encoded,
                   pad: int, config: TrainConfig, device: torch.device, dist_info: Dist,
                   log: Callable[[str], None] = print, order: str = "sequential", into: dict | None = None) -> dict:
    """Train a copy of ``base`` in each variant; {name: measurements and results}, also put into
    ``into`` as each variant finishes (a run stopped by a signal keeps the finished ones).

    ``sequential`` trains one variant after the other. ``alternate`` gives them a step each in
    turn, swapping the order every round (a variant's profiled steps run back to back), so that
    both are timed under the same conditions: a CPU's throughput drifts by tens of percent between
    runs minutes apart. Each variant keeps its own random state, so the order changes its
    timings and nothing else. Both models are resident then, so peak memory is not measured.
    """
    if order not in VARIANT_ORDERS:
        raise ValueError(f"order must be one of {VARIANT_ORDERS}, got {order!r}")
    results = {} if into is None else into
    alternate = order == "alternate" and len(names) > 1
    runs = {name: _training(name, base, train_data, test_data, pad, config, device, dist_info, log,
                            measure_memory=not alternate) for name in names}
    if not alternate:
        for name, steps in runs.items():
            results[name] = _finish(steps)
        return results
    stepping = {name: _OwnRandomState(steps, device) for name, steps in runs.items()}
    turn = list(names)
    while any(name not in results for name in names):
        for name in turn:
            while name not in results:
                try:
                    if not stepping[name].step():
                        break
                except StopIteration as stop:
                    results[name] = stop.value
        turn.reverse()
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _reduce_measurements(losses, step_ms, useful_tokens, all_tokens, peak_bytes, dist_info: Dist) -> dict:
    """Per-step losses averaged over ranks; tokens summed over ranks; the timed seconds behind
    tokens/s and the peak memory: the slowest rank's (the ranks wait for each other at every step
    anyway); the step-time statistics: this rank's steps (rank 0 reports them)."""
    losses = [x / dist_info.world_size for x in dist_info.reduce(losses)]
    seconds = sum(step_ms) / 1e3
    useful, total = sum(useful_tokens), sum(all_tokens)
    useful, total = dist_info.reduce([useful, total])
    seconds, peak_bytes = dist_info.reduce([seconds, peak_bytes], op="max")
    timing = common.summary_ms(step_ms)
    return {
        "losses": losses,
        "timed_steps": len(step_ms),
        "step_ms": {"median": timing["median"], "p20": timing["p20"], "p80": timing["p80"],
                    "min": min(step_ms, default=math.nan), "max": max(step_ms, default=math.nan),
                    "spread": timing["p80"] - timing["p20"]},
        "tokens_per_s": useful / seconds if seconds > 0 else math.nan,
        "padded_tokens_per_s": total / seconds if seconds > 0 else math.nan,
        "padding_fraction": 1 - useful / total if total else math.nan,
        "peak_memory_mib": peak_bytes / 2**20 if peak_bytes else None,
    }


# --------------------------------------------------------------------------------------------
# equivalence
# --------------------------------------------------------------------------------------------
def _mixed_length_batch(data: data_lib.Encoded, pad: int, config: TrainConfig, device: torch.device):
    """(ids, padding, labels): half the shortest reviews and half the longest, so that most keys of
    the short ones are padding."""
    order = sorted(range(len(data)), key=lambda i: data.lengths[i])
    size = min(config.batch_size, len(order))
    indices = order[:size // 2] + order[len(order) - (size - size // 2):]
    return (t.to(device) for t in data_lib.collate(data, indices, pad))


# Dropout check: the ratio of the variants' logit variances over draws must lie in [1/x, x]; the
# mean squared z-score of their mean logits at most the second number (1 when they agree). With
# 64 draws the ratio scatters by about 0.04 around 1 (a 2-layer model on a CPU, six seeds: 0.92 to
# 1.03); the residual or activation dropout skipped, or every dropout at half its rate, moves it
# to 0.2-0.7.
DROPOUT_VARIANCE_RATIO, DROPOUT_MEAN_Z2 = 1.25, 4.0


def compare_dropout(base: nn.Module, data: data_lib.Encoded, pad: int, config: TrainConfig,
                    device: torch.device, draws: int = 64) -> dict:
    """With dropout on, the variants cannot be compared draw by draw (their masks differ), but their
    logits' distributions over draws can: ``draws`` training-mode forwards of both variants from
    the same weights (``base``, with its dropout) on one padded batch, their per-logit means and
    variances compared. Catches a fastformer dropout that is skipped, at another rate or not
    rescaled, which the dropout-0 checks cannot see."""
    ids, padding, labels = _mixed_length_batch(data, pad, config, device)
    # Only the layers' dropouts: PyTorch runs the others (embeddings, head) in both variants, and
    # their variance would hide a fault in the layers' (the embeddings' alone dominates).
    base = copy.deepcopy(base)
    for name, module in base.named_modules():
        if isinstance(module, nn.Dropout) and not re.search(r"(^|\.)layers?\.\d+\.", name):
            module.p = 0.0
    stats = {}
    for kernels in models.KERNELS:
        model = models.make_variant(base, kernels, config.backend).to(device).train()
        with torch.no_grad(), _autocast(device, config.precision):
            samples = torch.stack([model(ids, padding).float() for _ in range(draws)]).double()
        stats[kernels] = (samples.mean(0), samples.var(0))
        del model
    (mean_t, var_t), (mean_f, var_f) = stats["torch"], stats["fastformer"]
    ratio = (var_f.mean() / var_t.mean().clamp_min(1e-30)).item()
    z2 = ((mean_f - mean_t).square() / ((var_f + var_t) / draws).clamp_min(1e-30)).mean().item()
    return {"draws": draws, "variance_ratio": ratio, "mean_z2": z2,
            "tolerances": (DROPOUT_VARIANCE_RATIO, DROPOUT_MEAN_Z2),
            "passed": 1 / DROPOUT_VARIANCE_RATIO <= ratio <= DROPOUT_VARIANCE_RATIO and z2 <= DROPOUT_MEAN_Z2}


def compare_first_step(base: nn.Module, data: data_lib.Encoded, pad: int, config: TrainConfig,
                       device: torch.device) -> dict:
    """Logits and every parameter's gradient of both variants on one batch, from the same weights
    (``base`` with dropout 0): half the shortest reviews and half the longest, so that most keys
    of the short ones are padding. A loss compared over a few Adam steps barely notices a gradient
    off by a constant factor (Adam normalises it away), nor the padding (bucketed batches have
    little): this does. A gradient that is zero in exact arithmetic (e.g. of the key projection's
    bias: softmax ignores a score shift shared by a row) is rounding noise in both variants, so
    each one's error is relative to at least 1e-3 of the norm of the whole gradient."""
    dropping = [(name, m.p) for name, m in base.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if dropping:
        raise ValueError(f"compare_first_step: the base model must have dropout 0 (the variants would draw "
                         f"different masks); {dropping[0][0]} has p={dropping[0][1]}")
    ids, padding, labels = _mixed_length_batch(data, pad, config, device)
    outputs = {}
    for kernels in models.KERNELS:
        model = models.make_variant(base, kernels, config.backend).to(device).train()
        with _autocast(device, config.precision):
            logits = model(ids, padding).float()
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(F.cross_entropy(logits, labels), list(params.values()), allow_unused=True)
        outputs[kernels] = (logits.detach(), {name: g for name, g in zip(params, grads) if g is not None})
        del model
    (ref_logits, ref_grads), (logits, grads) = outputs["torch"], outputs["fastformer"]
    floor = 1e-3 * math.sqrt(sum(g.double().square().sum().item() for g in ref_grads.values()))
    grad_errors = {name: common.relative_error(grads[name], ref, floor) if name in grads else math.inf
                   for name, ref in ref_grads.items()}
    worst = max(grad_errors, key=grad_errors.get, default=None)
    logits_error = common.relative_error(logits, ref_logits)
    tolerances = (LOSS_TOLERANCE[config.precision], GRAD_TOLERANCE[config.precision])
    return {"logits_relative_error": logits_error, "max_gradient_relative_error": grad_errors.get(worst, 0.0),
            "worst_gradient": worst, "padding_fraction": float(padding.float().mean()),
            "tolerances": tolerances, "passed": logits_error <= tolerances[0] and all(
                e <= tolerances[1] for e in grad_errors.values()) and set(grads) == set(ref_grads)}


@contextlib.contextmanager
def _tf32_off():
    """TF32 matmuls (cuBLAS, cuDNN, and so fastformer's float32 attention) off inside the block."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@_tf32_off()
def check_equivalence(base: nn.Module, train_data: data_lib.Encoded, pad: int, config: TrainConfig,
                      steps: int, device: torch.device, dist_info: Dist,
                      with_dropout: nn.Module | None = None) -> dict:
    """Both variants from the same weights (``base`` must have dropout 0): the first step's logits
    and gradients on a padded batch (:func:`compare_first_step`), then ``steps`` steps on the same
    random batches (not length-bucketed: they hold padding), whose losses must agree step by step;
    with ``with_dropout`` (the same weights, dropout on), the distributions of their logits in
    training mode (:func:`compare_dropout`). Always eager: it checks fastformer's ops against
    PyTorch's, not torch.compile. TF32 is off during the check: its 10-bit products, in every
    matmul of a whole model, would blur the float32 tolerances of DESIGN.md, which are those of
    one op."""
    config = dataclasses.replace(config, max_steps=steps, epochs=max(1, config.epochs), evaluate=False,
                                 profile_steps=0, warmup_steps=0, progress=False, bucketing=False,
                                 compile=False)
    first_step = compare_first_step(base, train_data, pad, config, device)
    dropout = None if with_dropout is None else compare_dropout(with_dropout, train_data, pad, config, device)
    variants = train_variants(list(models.KERNELS), base, train_data, train_data, pad, config, device, dist_info)
    runs = {kernels: run["losses"] for kernels, run in variants.items()}
    reference, candidate = runs["torch"], runs["fastformer"]
    differences = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(reference, candidate)]
    tolerance = LOSS_TOLERANCE[config.precision]
    worst = max(differences, default=math.nan)
    finite = all(math.isfinite(x) for x in reference + candidate)
    return {"steps": len(differences), "tolerance": tolerance, "max_relative_difference": worst, "tf32": False,
            "passed": bool(differences) and finite and worst <= tolerance and first_step["passed"]
            and (dropout is None or dropout["passed"]),
            "first_step": first_step, "dropout": dropout, "losses": runs, "relative_differences": differences,
            "criterion": "dropout 0, same weights: on one padded batch, logits within DESIGN.md's attention "
                         "forward tolerance and every parameter gradient within its gradient tolerance "
                         "(relative norms); then on the same random batches, |loss_fastformer - loss_torch| / "
                         "|loss_torch| <= the forward tolerance at every step; with dropout on (the layers' only), "
                         "the ratio of their logit variances over draws within [1/1.25, 1.25] and their means "
                         "agreeing (mean squared z-score <= 4)"}
