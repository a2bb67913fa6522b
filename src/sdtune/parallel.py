"""How several processes share one training run; the loop calls the same few methods whichever is in use.

single  one process: nothing to share.
ddp     torch's DistributedDataParallel: every process holds the whole model; gradients are averaged in
        buckets while the backward pass still runs (overlapping it), and not at all on the micro-batches an
        accumulating step sums first (no_sync).
fsdp    FSDP2 (`fully_shard`) on every layer of each trained component: parameters, gradients and Adam state
        are split across processes and a layer is gathered only while it computes. For full fine-tunes.

Each process's loss is the mean over its own share of the global batch and both engines average gradients
over processes, so N processes with batch B step like one process with batch N*B.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import SdtuneError
from .faults import resume_hint

# How a collective that waited in vain for another process fails (gloo, NCCL), in lower case: the
# process-group timeout ran out ("Timed out waiting 10000ms for recv", "Application timeout caused pair
# closure", "collective operation timeout") or the peer's connection broke.
LOST_PEER_SIGNS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer",
                   "communicator was aborted")
ROLL_CALL_SECONDS = 5.0  # how long survivors wait for each other to say they still answer


class Single:
    """One process: the loop's own step, nothing wrapped."""

    kind = "single"
    shards = False  # whether checkpoints hold each process's shard (torch's distributed checkpoint)

    def wrap(self, call: torch.nn.Module) -> torch.nn.Module:
        return call

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @property
    def is_main(self) -> bool:
        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def gather(self, model) -> None:
        """Make `model` hold its full trained weights on the main process (for saving)."""

    def write_shards(self, folder: Path, optimizer) -> Path | None:
        """Every process writes its shard of the trained values and optimizer state into `folder`."""
        return None


class Replicated(Single):
    """DDP around the UNet call, which also registers the trained values living outside the UNet (text
    encoders, hypernetwork modules): their gradients reach them through the call's inputs."""

    kind = "ddp"

    def __init__(self, device: torch.device):
        self.device = device
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None

    def wrap(self, call: torch.nn.Module) -> torch.nn.Module:
        # find_unused_parameters: a param group that stops training mid-run (text encoder steps) sends no
        # gradient; bucket views: the gradients live in the all-reduce buffers, not in a second copy.
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            call, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=True, gradient_as_bucket_view=True)
        return self.ddp

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()


class Sharded(Single):
    """FSDP2 over the components holding trained values: one unit per item of every ModuleList in them (a
    UNet's blocks, their ResNet and attention layers, each transformer block; a text encoder's layers), each
    owning what its own units do not, plus the component for the rest. Fine units keep the values gathered
    at once small (SDXL's largest: 49 M of its 2.6 B)."""

    kind = "fsdp"
    shards = True

    def __init__(self, model, names: list[str], weight_dtype: torch.dtype):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        components = model.components()
        # A meta-device twin of each component (no memory) receives the gathered weights for saving.
        self.twins = {name: _meta_twin(components[name]) for name in names}
        policy = MixedPrecisionPolicy(param_dtype=None if weight_dtype == torch.float32 else weight_dtype,
                                      reduce_dtype=torch.float32)
        self.roots = []
        for name in names:
            for unit in reversed(list(_units(components[name]))):  # the innermost first, as FSDP2 wants
                fully_shard(unit, mp_policy=policy)
            self.roots.append(fully_shard(components[name], mp_policy=policy))
        self.sharded = torch.nn.ModuleDict(dict(zip(names, self.roots)))  # one module for the state dicts

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        for root in self.roots:
            root.set_requires_gradient_sync(last)  # accumulate unsharded gradients; reduce on the last
        return contextlib.nullcontext()

    def gather(self, model) -> None:
        """Gather each sharded component once (every process takes part); the main process then holds plain
        full-size modules, so the method saves them in its usual formats."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # only rank 0 receives them
        for (name, twin), root in zip(self.twins.items(), self.roots):
            full = get_model_state_dict(root, options=options)
            if self.is_main:
                twin.load_state_dict(full, assign=True)
                model.replace(name, twin)

    def write_shards(self, folder: Path, optimizer) -> Path:
        """torch's distributed checkpoint: each process writes only its own shard (no gathering)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(optimizer), checkpoint_id=str(folder))
        return folder

    def read_shards(self, folder: Path, optimizer) -> None:
        """Load what write_shards wrote (same processes) into the sharded model and the optimizer."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state(optimizer)
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.sharded, _unwrapped(optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def _state(self, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.sharded, _unwrapped(optimizer))
        return {"model": model_state, "optimizer": optimizer_state}


def _unwrapped(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer


def prepare(train_cfg, data_cfg, method, model, param_groups: list[dict], world: int, device: torch.device,
            weight_dtype: torch.dtype) -> Single:
    """The engine for --distributed; FSDP shards the model here and puts the sharded parameters into
    `param_groups` in place of the originals. Refuses in one line what makes no sense."""
    choice = train_cfg.distributed
    if choice == "fsdp":
        _check_shardable(method, train_cfg, data_cfg)
        if any(group.get("stop_after") for group in param_groups):
            raise SdtuneError("--distributed fsdp cannot stop training part of the model mid-run "
                              "(--train-text-encoder-steps) yet; drop one of them.")
    if world == 1:
        if choice != "auto":
            raise SdtuneError(f"--distributed {choice} needs several processes; launch with torchrun "
                              "--nproc_per_node N (this run has one process), or leave it at auto.")
        return Single()
    if choice in ("auto", "ddp"):
        return Replicated(device)
    trained = {id(p) for group in param_groups for p in group["params"]}
    names = [name for name, module in model.components().items()
             if any(id(p) in trained for p in module.parameters())]
    where = {id(p): (name, key) for name in names for key, p in model.components()[name].named_parameters()}
    engine = Sharded(model, names, weight_dtype)
    components = model.components()
    for group in param_groups:  # fully_shard replaced every parameter of the sharded components
        group["params"][:] = [components[where[id(p)][0]].get_parameter(where[id(p)][1]) if id(p) in where
                              else p for p in group["params"]]
    return engine


# What FSDP cannot do here yet -> the one-line reason (checked before any work).
FSDP_REFUSALS = {
    "validation_every": "validation images are drawn by the main process alone, from a model each process "
                        "holds only part of",
    "validation_images": "the validation loss is read by the main process alone, from a model each process "
                         "holds only part of",
    "ema_decay": "the moving average of sharded weights is not kept yet",
    "use_8bit_adam": "bitsandbytes' 8-bit AdamW does not step sharded parameters",
}


def _check_shardable(method, cfg, data_cfg) -> None:
    if not method.shardable:
        raise SdtuneError(f"--distributed fsdp shards full fine-tunes (dreambooth); {method.name} trains few "
                          "enough values that every process holds them whole, so use --distributed ddp.")
    for field_name, reason in FSDP_REFUSALS.items():
        if getattr(cfg, field_name, None) or getattr(data_cfg, field_name, None):
            raise SdtuneError(f"--distributed fsdp cannot be combined with --{field_name.replace('_', '-')}: "
                              f"{reason}; drop one of them.")
    if cfg.compile not in ("auto", "off"):
        raise SdtuneError(f"--distributed fsdp runs the UNet eagerly; use --compile off or auto "
                          f"(not {cfg.compile}).")


def _units(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The items of every ModuleList below `module`, each before the ones inside it."""
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList):
            for item in child:
                yield item
                yield from _units(item)
        else:
            yield from _units(child)


def _meta_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose parameters are empty meta tensors (buffers shared): costs no memory."""
    memo: dict[int, object] = {id(b): b for b in module.buffers()}
    for param in module.parameters():
        memo[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                             requires_grad=param.requires_grad)
    return copy.deepcopy(module, memo)


def state_bytes(params: list[torch.Tensor], optimizer) -> int:
    """Bytes this process holds of the trained values, their gradients and the optimizer's state (the local
    shard of each sharded tensor)."""
    def local(tensor) -> int:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return tensor.numel() * tensor.element_size()

    total = sum(local(p) + (local(p.grad) if p.grad is not None else 0) for p in params)
    for state in optimizer.state.values():
        total += sum(local(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def most_over_processes(value: int, device: torch.device) -> int:
    """The largest of each process's `value` (every process takes part; one process: the value itself)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


@contextlib.contextmanager
def lost_process_advice(out_dir: str | Path) -> Iterator[None]:
    """Turn a collective that timed out waiting for another process into one line naming the silent one."""
    try:
        yield
    except RuntimeError as exc:
        if not torch.distributed.is_initialized() or not any(sign in str(exc).lower() for sign in LOST_PEER_SIGNS):
            raise
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        silent = _silent_processes(rank, world)
        who = ", ".join(map(str, silent)) if silent else "another process"
        raise SdtuneError(f"Process rank {who} of {world} stopped answering (crashed, stopped or on a lost "
                          f"machine) and rank {rank} gave up waiting for it; find out why, "
                          f"{resume_hint(Path(out_dir))}.") from None


def _silent_processes(rank: int, world: int) -> list[int]:
    """The ranks that do not sign in with the run's store within ROLL_CALL_SECONDS: the launcher's store
    outlives a stopped worker, so the survivors learn who is gone."""
    store = torch.distributed.distributed_c10d._get_default_store()
    key = "sdtune/answering/{}".format
    store.set(key(rank), "1")
    deadline = time.monotonic() + ROLL_CALL_SECONDS
    while True:
        silent = [other for other in range(world) if not store.check([key(other)])]
        if not silent or time.monotonic() > deadline:
            return silent
        time.sleep(0.2)
