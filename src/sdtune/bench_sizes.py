"""Artifact sizes at full scale, without the memory full-size models need.

The architecture is built on the meta device (shapes, no storage) and the method set up on it as for
training. A method whose artifact is small gets its trained values as real zero tensors and writes its real
file(s); one whose artifact holds the whole model (DreamBooth) says which tensors its files hold
(`planned_files`), and their bytes come from shapes x dtype sizes (headers and config files aside).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from . import __version__

GIB = 2**30


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data a safetensors file of `tensors` holds (its header aside)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _materialise(params: list[torch.nn.Parameter]) -> None:
    """Give meta-device parameters real zero storage in place, so every module holding them sees it."""
    for param in params:
        if param.is_meta:
            torch.utils.swap_tensors(param, torch.nn.Parameter(torch.zeros(param.shape, dtype=param.dtype),
                                                               requires_grad=param.requires_grad))


def _set_up(spec: str, method_name: str):
    """(model, method, trained parameters): `method_name` with its defaults set up on the `spec` architecture
    built on the meta device (no memory)."""
    from . import methods
    from .bench import DEFAULT_TOKEN
    from .config import DataConfig
    from .model import build_from_config
    from .optimization import as_param_groups

    model = build_from_config(spec, device="meta")
    method_cls = methods.get(method_name)
    method = method_cls()
    method.check_data(model, DataConfig(token=method_cls.token_template.format(token=DEFAULT_TOKEN), class_word="dog"))
    return model, method, [p for group in as_param_groups(method.setup(model)) for p in group["params"]]


def method_size(spec: str, method_name: str, out_dir: Path) -> dict:
    """What `method_name`'s default artifact for the `spec` architecture weighs, and how that was found."""
    model, method, params = _set_up(spec, method_name)
    record = {"method": method_name, "model": spec, "trainable_params": sum(p.numel() for p in params)}
    planned = method.planned_files(model, method_name)
    if planned is not None:
        files = {name: payload_bytes(tensors) for name, tensors in planned.items()}
        return {**record, "how": "from shapes", "files": files, "bytes": sum(files.values())}
    _materialise(params)
    card = {"method": method.name, "sdtune_version": __version__, "base_model": spec, "base_family": model.family,
            "steps": "0", "seed": "0"}
    paths = method.save(model, out_dir, method_name, card, None)
    files = {p.name: p.stat().st_size for p in paths}
    return {**record, "how": "written", "files": files, "bytes": sum(files.values())}


def artifact_sizes(spec: str, method_names: list[str]) -> dict:
    """Sizes of every method's artifact for one architecture."""
    with tempfile.TemporaryDirectory(prefix="sdtune-sizes-") as tmp:
        rows = [method_size(spec, name, Path(tmp)) for name in method_names]
    return {"kind": "sizes", "model": spec, "rows": rows}


WORLD_SIZES = (1, 2, 4, 8)
ADAMW_BYTES_PER_VALUE = 16  # the fp32 value, its fp32 gradient and AdamW's two fp32 moments


def sharded_state(spec: str, method_names: list[str]) -> dict:
    """Per process, the bytes of each method's trained values, gradients and AdamW state at 1, 2, 4 and 8
    processes: split by --distributed fsdp where the method shards, whole in every process (ddp) elsewhere;
    and the largest FSDP unit (values gathered at once)."""
    from .parallel import _units

    rows = []
    for name in method_names:
        model, method, params = _set_up(spec, name)
        trained = sum(p.numel() for p in params)
        ids = {id(p) for p in params}
        units = [unit for module in model.components().values() for unit in _units(module)
                 if any(id(p) in ids for p in unit.parameters())] if method.shardable else []
        rows.append({"method": name, "engine": "fsdp" if method.shardable else "ddp", "trainable_params": trained,
                     "per_process": {n: trained * ADAMW_BYTES_PER_VALUE // (n if method.shardable else 1)
                                     for n in WORLD_SIZES},
                     "largest_unit": max((_own_values(unit) for unit in units), default=0)})
    return {"kind": "sharding", "model": spec, "rows": rows}


def _own_values(unit: torch.nn.Module) -> int:
    """Values an FSDP unit gathers itself: its parameters outside the units nested in it."""
    from .parallel import _units

    nested = {id(p) for inner in _units(unit) for p in inner.parameters()}
    return sum(p.numel() for p in unit.parameters() if id(p) not in nested)


BYTE_UNITS = ((GIB, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))


def byte_unit(largest: float) -> tuple[int, str]:
    """(divisor, unit) that shows byte counts up to `largest` in binary units: 1536 -> (1024, 'KiB')."""
    return next((size, unit) for size, unit in BYTE_UNITS if abs(largest) >= size or size == 1)


def human_bytes(count: float | None) -> str:
    """1536 -> '1.5 KiB' (None: '–')."""
    if count is None:
        return "–"
    size, unit = byte_unit(count)
    return f"{count:.0f} {unit}" if size == 1 else f"{count / size:.1f} {unit}"
