"""One process, DDP or DeepSpeed ZeRO-2/3: what every trainer needs to run the same global batch on any number of
processes, written once (rl/common.py and the trainers call it; accelerate does the launching and wrapping).

Global batches. Every batch size in an algorithm's config is global, so a config means the same training run on
one GPU or eight:

- The epoch's prompts (``rl.common.prompt_batch``) and their G-sample groups are the same on every process.
- Rollouts go in rounds of ``rollout_batch_size`` rows. Every process draws a round's random choices (tau, the
  SDE window, the initial noise z_T of *all* the round's rows) exactly as a single process does, then keeps its
  contiguous 1/P slice (``process_slice``). The rows another process needs (rewards for group normalisation,
  DiffusionNFT's z_tau for the update) are all-gathered back into global row order (``gather_rows``).
- An optimizer step covers ``train_batch_size`` global rows; each process takes 1/P of them, in
  ``run.gradient_accumulation_steps`` micro-batches, and weights each micro-batch's mean loss by its share of the
  global batch (``loss_weight``), so that the gradient DDP / DeepSpeed average over processes is the mean over the
  global batch.

Gradient accumulation (``gradient_sync``). Forward and backward of every micro-batch but the last of an optimizer
step run unsynchronised (DDP's ``no_sync``; DeepSpeed with its gradient-accumulation boundary off); the last one
all-reduces. Under DeepSpeed, accelerate's engine wrapper takes the optimizer step inside that last backward, with
``gradient_clipping`` = the algorithm's ``max_grad_norm`` (``configure_deepspeed``) and refusing a step whose
gradient is non-finite; ``rl.common.clipped_step`` then only reports what happened. A non-finite loss is turned
into a non-finite gradient (``backward``), so that every backend's step refuses it on every process.

ZeRO-3 partitions parameters: ``policies.lora`` gathers LoRA adapters wherever it reads or writes them outside a
forward pass (a collective: every process calls those functions). Under DeepSpeed the optimizer holds the trained
LoRA's fp32 master weights and AdamW moments in partitions; ``master_weights`` and ``optimizer_state_dict`` read
them back in full, in torch AdamW's own layout, and the ``load_*`` twins write them, so a checkpoint resumes under
any backend and number of processes.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import Tensor, nn

from rl.config import ConfigError


# ------------------------------------------------------------------------------------------------ backends
def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage, 0 without DeepSpeed."""
    return int(accelerator.state.deepspeed_plugin.zero_stage) if is_deepspeed(accelerator) else 0


def backend_name(accelerator) -> str:
    """``single``, ``ddp``, ``zero2``, ``zero3``… (logged, and used in error messages)."""
    if is_deepspeed(accelerator):
        return f"zero{zero_stage(accelerator)}"
    return "ddp" if accelerator.num_processes > 1 else "single"


@contextlib.contextmanager
def no_zero3_init(accelerator):
    """Build models whole. With a ZeRO-3 config registered (accelerate registers it), transformers partitions every
    model it constructs (``deepspeed.zero.Init``); only the policy's transformer goes to DeepSpeed here — the frozen
    text encoders, VAE, reward and critic must stay ordinary modules."""
    plugin = accelerator.state.deepspeed_plugin if is_deepspeed(accelerator) else None
    if plugin is None or zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def configure_deepspeed(accelerator, max_grad_norm: float, micro_batch_size: int) -> None:
    """Fill the DeepSpeed config before ``accelerator.prepare``: the trainers accumulate gradients themselves
    (explicit boundaries, ``gradient_sync``), so DeepSpeed's own accumulation count is 1; its gradient clipping is
    the algorithm's ``max_grad_norm``; ``train_micro_batch_size_per_gpu`` is informational (DeepSpeed checks it
    against ``train_batch_size``; it never builds our batches). Conflicting values in the accelerate config are
    an error rather than silently overridden."""
    if not is_deepspeed(accelerator):
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {"gradient_accumulation_steps": 1, "gradient_clipping": float(max_grad_norm)}
    fixes = {"gradient_accumulation_steps": "set run.gradient_accumulation_steps instead",
             "gradient_clipping": "the trainer sets it from algo.max_grad_norm"}
    for key, value in wanted.items():
        have = ds.get(key, "auto")
        if have not in ("auto", None) and float(have) != value:
            raise ConfigError(f"the accelerate/DeepSpeed config sets {key}={have}: remove it ({fixes[key]})")
    ds.update(wanted, train_micro_batch_size_per_gpu=int(micro_batch_size),
              train_batch_size=int(micro_batch_size) * accelerator.num_processes)


def zero3_leaf_blocks(accelerator, transformer: nn.Module) -> list[str]:
    """Under ZeRO-3, make each transformer block one unit of parameter fetching (``set_z3_leaf_modules``).

    ZeRO-3 gathers and releases parameters with Python hooks on every submodule. peft wraps each adapted Linear in
    a LoraLayer with ModuleDicts of lora_A / lora_B / dropout, so one MMDiT block carries ~60 hooked modules and, on
    a small model, the hooks cost more than the arithmetic (NFT on Shapes: 2.5x the plain epoch on a CPU, 9x on an
    H200). As leaves, a block's parameters are all-gathered in one go before its forward and released after; the
    memory at rest stays partitioned, at most one block is gathered at a time. Returns the leaf class names."""
    if zero_stage(accelerator) != 3:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    blocks = getattr(transformer, "transformer_blocks", None)
    if not blocks:
        return []
    classes = list(dict.fromkeys(type(b) for b in blocks))
    set_z3_leaf_modules(transformer, classes)
    return [c.__name__ for c in classes]


# ------------------------------------------------------------------------------------------------ batch layout
def check_layout(accelerator, accumulation: int, rows: int, train_batch_size: int,
                 rollout_batch_size: int | None = None, rows_name: str = "prompts_per_epoch * group_size") -> None:
    """The global batch sizes must split evenly over the processes (and accumulation steps): every process then
    runs the same number of forward and backward passes, which DDP's and ZeRO-3's collectives require."""
    num = accelerator.num_processes
    if accumulation < 1:
        raise ConfigError(f"run.gradient_accumulation_steps: must be >= 1, got {accumulation}")
    checks = [(rows, rows_name, num, f"{num} processes"),
              (train_batch_size, "algo.train_batch_size", num * accumulation,
               f"{num} processes x {accumulation} accumulation steps")]
    if rollout_batch_size is not None:
        checks.append((rollout_batch_size, "algo.rollout_batch_size", num, f"{num} processes"))
    for value, name, divisor, what in checks:
        if value % divisor:
            raise ConfigError(f"{name} = {value} must be a multiple of {divisor} ({what}): batch sizes are global "
                              f"and split evenly across processes and accumulation steps")


def process_slice(n: int, accelerator) -> slice:
    """This process's contiguous 1/P share of n rows (n must be a multiple of P)."""
    num, rank = accelerator.num_processes, accelerator.process_index
    if n % num:
        raise ValueError(f"{n} rows do not split evenly over {num} processes")
    size = n // num
    return slice(rank * size, (rank + 1) * size)


def padded_rows(n: int, accelerator) -> tuple[list[int], int]:
    """For a batch of n rows that need not split evenly (evaluation): this process's ceil(n / P) row indices —
    padded by repeating a row, so every process runs the same passes — and how many of them are real."""
    num, rank = accelerator.num_processes, accelerator.process_index
    size = math.ceil(n / num)
    rows = list(range(rank * size, min(n, (rank + 1) * size)))
    real = len(rows)
    pad = rows[-1] if rows else n - 1
    return rows + [pad] * (size - real), real


def micro_batches(n: int, accumulation: int) -> list[slice]:
    """Split n local rows into min(accumulation, n) consecutive micro-batches (sizes differ by at most one)."""
    count = max(1, min(accumulation, n))
    bounds = np.linspace(0, n, count + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def loss_weight(micro_rows: int, global_rows: int, accelerator) -> float:
    """Weight of a micro-batch's mean loss: its share of the optimizer step's global rows, times P because DDP and
    DeepSpeed average (not sum) gradients over processes."""
    return micro_rows * accelerator.num_processes / global_rows


def gather_rows(accelerator, x: Tensor, rows: Tensor | list[int], n: int) -> Tensor:
    """The global (n, ...) tensor assembled from every process's rows ``x`` (k, ...) at global indices ``rows``
    (k,); an index of -1 marks a padding row, dropped. Every process passes the same k."""
    rows = torch.as_tensor(rows, device=x.device, dtype=torch.long)
    if x.dtype == torch.bool:  # not every collective backend carries bool
        return gather_rows(accelerator, x.to(torch.uint8), rows, n).bool()
    if accelerator.num_processes == 1:
        keep = rows >= 0
        out = x[keep]
        if not torch.equal(rows[keep], torch.arange(n, device=x.device)):
            out = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
            out[rows[keep]] = x[keep]
        return out
    xs, idx = accelerator.gather(x.contiguous()), accelerator.gather(rows)
    keep = idx >= 0
    out = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    out[idx[keep]] = xs[keep]
    return out


def gather_objects(accelerator, items: list) -> list:
    """Every process's list of picklable items, concatenated in process order."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def sum_over_processes(accelerator, x: Tensor) -> Tensor:
    """``x`` summed over processes (e.g. per-process shares of a logged mean), returned on x's device."""
    if accelerator.num_processes == 1:
        return x
    return accelerator.reduce(x.to(accelerator.device), reduction="sum").to(x.device)


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (e.g. SIGTERM seen, time budget spent): control flow
    that decides collectives (checkpoint, stop) must agree across processes."""
    if accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def process_generator(seed: int, epoch: int, stage: int, accelerator) -> torch.Generator:
    """A generator for randomness that is per process by nature (SDE noise of a process's own rows, the order of
    its own minibatches): a function of (seed, epoch, stage, rank), so a resumed run draws the same."""
    rng = np.random.default_rng([seed, epoch, stage, accelerator.process_index])
    return torch.Generator(accelerator.device).manual_seed(int(rng.integers(2**31)))


# ------------------------------------------------------------------------------------------------ gradients
@contextlib.contextmanager
def gradient_sync(accelerator, model: nn.Module | None, sync: bool):
    """Around the forward *and* backward of one micro-batch (DDP decides at forward time whether the backward
    all-reduces). ``sync``: the last micro-batch of an optimizer step — gradients are reduced across processes
    and, under DeepSpeed, the engine steps in its backward. Otherwise gradients only accumulate locally."""
    accelerator.sync_gradients = sync  # DeepSpeed: the gradient-accumulation boundary (accelerate's wrapper reads it)
    try:
        if sync or model is None:
            yield
        else:
            with accelerator.no_sync(model):
                yield
    finally:
        accelerator.sync_gradients = True


def backward(accelerator, loss: Tensor) -> Tensor:
    """``accelerator.backward(loss)``; returns whether the loss was finite, as a 0-dim bool tensor on the loss's
    device (reading it is the caller's one host sync per optimizer step, not one per pass). A non-finite loss is
    multiplied by NaN first, so its gradient is non-finite for certain: DDP's all-reduce then carries the NaN to
    every process and every backend's guarded step (rl.common.clipped_step, DeepSpeed's overflow check) refuses the
    update. A finite loss is multiplied by exactly 1."""
    finite = torch.isfinite(loss.detach()).all()
    scale = torch.where(finite, 1.0, math.nan).to(loss.dtype)
    accelerator.backward(loss * scale)
    return finite


def deepspeed_step_result(accelerator, optimizer) -> tuple[float, bool]:
    """(gradient norm, stepped) of the step DeepSpeed took in the last synchronised backward."""
    from rl.checkpoint import NonFiniteError

    norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
    norm = float(norm) if norm is not None else math.nan
    stepped = not optimizer.step_was_skipped
    if stepped and not math.isfinite(norm):
        raise NonFiniteError(f"DeepSpeed applied an optimizer step with gradient norm {norm}: enable its overflow "
                             f"check (bf16.check_grad_overflow: true) so non-finite gradients are refused")
    return norm, stepped


def any_process_of_group(flag: bool, device: torch.device | str = "cpu") -> bool:
    """any_process for code outside accelerate (the co-trained critic): True on every process of the default
    process group when ``flag`` is on any; ``flag`` itself on one process. ``device``: where the group's backend
    reduces (a GPU for NCCL)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bool(flag)
    if torch.distributed.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


def average_gradients(params: list[nn.Parameter], finite: bool) -> bool:
    """For a module trained outside accelerate (the co-trained critic): average its gradients over processes so
    every copy takes the same step; returns whether every process's loss was finite. No-op on one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return finite
    world = torch.distributed.get_world_size()
    if world == 1:
        return finite
    flag = torch.tensor([0.0 if finite else 1.0], device=params[0].device)  # where the gradients are (NCCL: GPU)
    torch.distributed.all_reduce(flag)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad.div_(world)
    return bool(flag.item() == 0)


# ------------------------------------------------------------------------------------------------ DeepSpeed state
def _zero_optimizer(optimizer):
    """accelerate's DeepSpeedOptimizerWrapper -> DeepSpeed's ZeRO optimizer -> the torch AdamW over flat partitions."""
    zero = optimizer.optimizer
    return zero, zero.optimizer


# DeepSpeed's dynamic fp16 loss scaler (deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler): the scale and the
# clocks that grow it back after an overflow. Its own checkpoints pickle the whole object; ours keep these numbers.
LOSS_SCALER_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _dynamic_loss_scaler(accelerator, optimizer):
    """DeepSpeed's dynamic (fp16) loss scaler behind accelerate's wrapper; None without DeepSpeed or with a static
    scale (bf16 and fp32 have a scale of 1)."""
    if not is_deepspeed(accelerator):
        return None
    scaler = getattr(_zero_optimizer(optimizer)[0], "loss_scaler", None)
    return scaler if getattr(scaler, "dynamic", False) else None


def loss_scaler_state(accelerator, optimizer) -> dict | None:
    """The dynamic loss scaler's state, for a checkpoint's JSON; None where there is none."""
    scaler = _dynamic_loss_scaler(accelerator, optimizer)
    return None if scaler is None else {k: getattr(scaler, k) for k in LOSS_SCALER_STATE if hasattr(scaler, k)}


def load_loss_scaler_state(accelerator, optimizer, state: dict) -> None:
    """Inverse of :func:`loss_scaler_state` (nothing to do without DeepSpeed's dynamic scaler)."""
    scaler = _dynamic_loss_scaler(accelerator, optimizer)
    for key in LOSS_SCALER_STATE if scaler is not None else ():
        if key in state:
            setattr(scaler, key, type(getattr(scaler, key))(state[key]))


def master_weights(accelerator, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Under DeepSpeed: the fp32 master copies of the trained parameters (the module holds bf16/fp16 copies with
    mixed precision), gathered in full, keyed like ``params``. {} otherwise. Collective."""
    if not is_deepspeed(accelerator):
        return {}
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in params.items():
        full = safe_get_full_fp32_param(p)
        if full is None:
            raise RuntimeError(f"DeepSpeed holds no fp32 master for '{name}' (requires_grad={p.requires_grad}): is "
                               f"the trained adapter active?")
        out[name] = full.detach().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape).clone()
    return out


def load_master_weights(accelerator, params: dict[str, nn.Parameter], state: dict[str, Tensor]) -> None:
    """Inverse of ``master_weights`` (the module's own copies are loaded separately, by policies.lora)."""
    if not is_deepspeed(accelerator):
        return
    from deepspeed.utils import safe_set_full_fp32_param

    for name, p in params.items():
        safe_set_full_fp32_param(p, state[name].to(accelerator.device, torch.float32))


def optimizer_state_dict(accelerator, optimizer, params: list[nn.Parameter]) -> dict:
    """The optimizer's ``state_dict()`` in torch AdamW's layout (params indexed 0..n-1 in ``params`` order). Under
    DeepSpeed the moments are gathered from ZeRO's partitions (collective)."""
    if not is_deepspeed(accelerator):
        return optimizer.state_dict()
    from deepspeed.utils import safe_get_full_optimizer_state

    _, inner = _zero_optimizer(optimizer)
    hyper = {k: v for k, v in inner.param_groups[0].items() if k in inner.defaults}
    group = {**inner.defaults, **hyper, "params": list(range(len(params)))}
    if not inner.state:  # no step taken yet: AdamW creates its state lazily
        return {"state": {}, "param_groups": [group]}
    step = next(iter(inner.state.values()))["step"]
    state = {}
    for i, p in enumerate(params):
        entry = {"step": step.detach().clone().cpu()}
        for key in ("exp_avg", "exp_avg_sq"):
            full = safe_get_full_optimizer_state(p, key)
            if full is None:
                raise RuntimeError(f"DeepSpeed holds no '{key}' for trained parameter {i}: is the trained adapter "
                                   f"active?")
            entry[key] = full.detach().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape).clone()
        state[i] = entry
    return {"state": state, "param_groups": [group]}


def load_optimizer_state_dict(accelerator, optimizer, params: list[nn.Parameter], state_dict: dict) -> None:
    """Inverse of ``optimizer_state_dict``: ``optimizer.load_state_dict`` without DeepSpeed; under DeepSpeed the
    AdamW state of ZeRO's flat partitions is created (AdamW makes it lazily at its first step) and filled."""
    if not is_deepspeed(accelerator):
        optimizer.load_state_dict(state_dict)
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    zero, inner = _zero_optimizer(optimizer)
    saved_group = state_dict["param_groups"][0]
    for group in inner.param_groups:
        group.update({k: v for k, v in saved_group.items() if k in inner.defaults})
    saved = state_dict["state"]
    if not saved:
        return
    if len(saved) != len(params):
        raise ValueError(f"optimizer state for {len(saved)} parameters, the trained LoRA has {len(params)}")
    step = saved[0]["step"]
    # AdamW's state is keyed by ZeRO's flat fp32 partitions (ZeRO-3 swaps them into the param groups per step)
    flats = zero.fp32_partitioned_groups_flat if zero_stage(accelerator) == 3 else zero.single_partition_of_fp32_groups
    for flat in flats:
        inner.state[flat] = {"step": step.detach().clone().float(), "exp_avg": torch.zeros_like(flat),
                             "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link each parameter's view into the flat state after the first step; link them to the new state
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, saved[i][key].to(accelerator.device, torch.float32), key)
