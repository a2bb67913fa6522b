"""`sdtune extract-lora`: a fine-tuned model (DreamBooth) -> a LoRA file of its difference to the base.

Each targeted layer's weight difference D (out x in, convolutions flattened to out x in*kh*kw) is cut to
its top-r singular directions, D_r = U_r S_r V_r^T, split evenly into lora_B = U_r sqrt(S_r) and
lora_A = sqrt(S_r) V_r^T (divided by alpha/r so that alpha/r * B @ A = D_r). How much of the difference
survives is reported as relative Frobenius norms: ||D_r|| / ||D|| over the extracted layers, and how much
of the whole change lies in those layers at all (biases, norms and untargeted layers cannot be carried).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SdtuneError
from .formats import written_names
from .methods.lora import TEXT_TARGETS, LoRA, encode_state, unet_target_modules

LAYOUT_NAMES = written_names(LoRA.layouts)  # `--format` choices: the LoRA layouts
DEFAULT_LAYOUT = LoRA.config_class().format  # as `sdtune train lora` writes


@dataclass
class ExtractReport:
    """What the chosen rank keeps: squared Frobenius norms, so they add over layers."""

    rank: int
    alpha: float | None  # None: alpha = each layer's rank (scale 1)
    layers: int = 0
    kept_sq: float = 0.0      # sum over extracted layers of ||D_r||^2
    layer_sq: float = 0.0     # sum over extracted layers of ||D||^2
    total_sq: float = 0.0     # sum over every parameter of the compared components of ||D||^2
    worst: tuple[float, str] = (1.0, "")  # (kept norm fraction, layer) of the least well kept layer
    per_layer: dict[str, float] = field(default_factory=dict)

    @property
    def kept(self) -> float:
        """||D_r||_F / ||D||_F over the extracted layers (1.0 = nothing lost)."""
        return math.sqrt(self.kept_sq / self.layer_sq) if self.layer_sq else 1.0

    @property
    def covered(self) -> float:
        """Share (Frobenius norm) of the whole weight change that lies in the extracted layers."""
        return math.sqrt(self.layer_sq / self.total_sq) if self.total_sq else 1.0

    def add(self, layer: str, kept_sq: float, layer_sq: float) -> None:
        self.layers += 1
        self.kept_sq += kept_sq
        self.layer_sq += layer_sq
        kept = math.sqrt(kept_sq / layer_sq) if layer_sq else 1.0
        self.per_layer[layer] = kept
        self.worst = min(self.worst, (kept, layer))

    def summary(self) -> str:
        alpha = f"{self.alpha:g}" if self.alpha else "= rank"
        lines = [f"rank {self.rank}, alpha {alpha}: {self.layers} layers extracted",
                 f"keeps {self.kept:.1%} of their weight difference (relative Frobenius norm; "
                 f"relative error {math.sqrt(max(0.0, 1 - self.kept ** 2)):.1%})"]
        if self.worst[1]:
            lines.append(f"least kept layer: {self.worst[1]} ({self.worst[0]:.1%})")
        lines.append(f"the extracted layers hold {self.covered:.1%} of the model's whole weight change")
        return "\n".join(lines)


def low_rank(delta: torch.Tensor, rank: int, alpha: float | None = None):
    """(lora_A, lora_B, alpha, kept_sq, total_sq) for one layer's weight difference, in peft's shapes."""
    matrix = delta.reshape(delta.shape[0], -1).float()
    r = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:r].sqrt()
    layer_alpha = float(alpha) if alpha else float(r)
    lora_b = u[:, :r] * root / (layer_alpha / r)
    lora_a = root[:, None] * vh[:r]
    if delta.ndim == 4:  # conv: A is a conv with the layer's kernel, B a 1x1 conv
        lora_a = lora_a.reshape(r, *delta.shape[1:])
        lora_b = lora_b[:, :, None, None]
    return (lora_a.contiguous(), lora_b.contiguous(), layer_alpha, float((s[:r] ** 2).sum()), float((s ** 2).sum()))


def check_settings(rank: int, alpha: float | None) -> None:
    """Refuse a rank below 1, or an alpha that is not a finite number >= 0 (0 or None: alpha = rank)."""
    if rank < 1:
        raise SdtuneError(f"--rank is {rank}; it must be at least 1.")
    if alpha is not None and not (math.isfinite(alpha) and alpha >= 0):
        raise SdtuneError(f"--alpha is {alpha:g}; it must be a finite number above 0, or 0 for alpha = rank.")


def extract_lora(base, tuned, rank: int, targets: str = "attn", text_encoder: bool = True,
                 alpha: float | None = None) -> tuple[dict[str, torch.Tensor], ExtractReport]:
    """Canonical LoRA state (`<component>.<path>.lora_A.weight` / `lora_B.weight` / `alpha`) for tuned - base."""
    check_settings(rank, alpha)
    if base.family != tuned.family:
        raise SdtuneError(f"The tuned model is {tuned.family} but the base is {base.family}; pass its own base.")
    _check_same_architecture(base, tuned)
    plan = {"unet": unet_target_modules(targets)}
    if text_encoder:
        plan.update({name: TEXT_TARGETS for name in base.components() if name.startswith("text_encoder")})
    report = ExtractReport(rank, alpha or None)
    state: dict[str, torch.Tensor] = {}
    for component, suffixes in plan.items():
        base_params = _parameters(base, component)
        tuned_modules = dict(tuned.components()[component].named_modules())
        for key, value in _parameters(tuned, component).items():
            report.total_sq += float((value.float() - base_params[key].float()).pow(2).sum())
        for path, module in tuned_modules.items():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not _matches(path, suffixes):
                continue
            delta = module.weight.detach().float() - base_params[f"{path}.weight"].float().to(module.weight.device)
            if not delta.any():
                continue  # untouched layer (e.g. a frozen text encoder)
            lora_a, lora_b, layer_alpha, kept_sq, layer_sq = low_rank(delta, rank, alpha)
            name = f"{component}.{path}"
            state.update({f"{name}.lora_A.weight": lora_a.cpu(), f"{name}.lora_B.weight": lora_b.cpu(),
                          f"{name}.alpha": torch.tensor(layer_alpha, dtype=torch.float32)})
            report.add(name, kept_sq, layer_sq)
    if not state:
        raise SdtuneError("The tuned model's targeted layers equal the base's; there is no difference to extract.")
    return state, report


def _parameters(model, component: str) -> dict[str, torch.Tensor]:
    """A component's weights by name."""
    return {k: v.detach() for k, v in model.components()[component].state_dict().items()}


def _matches(path: str, suffixes: list[str]) -> bool:
    """peft's target rule: the module's name is the target or ends with `.target`."""
    return any(path == s or path.endswith("." + s) for s in suffixes)


def extract_lora_file(base_spec: str, tuned_spec: str, rank: int, output: str | Path, targets: str = "attn",
                      fmt: str = DEFAULT_LAYOUT, text_encoder: bool = True, alpha: float | None = None,
                      model_config: str | None = None) -> str:
    """Load both models, extract, write `output` atomically (kohya layout by default); return the report."""
    from .artifacts import run_card, save_artifact
    from .model import load

    check_settings(rank, alpha)  # before two models are loaded
    output = Path(output)
    base, tuned = load(base_spec, config=model_config), load(tuned_spec, config=model_config)
    state, report = extract_lora(base, tuned, rank, targets, text_encoder, alpha)
    tensors, extra = encode_state(state, fmt, base)
    card = run_card(method=LoRA.name, base_model=base.source, base_family=base.family, base_hash=base.fingerprint(),
                    prediction_type=base.prediction_type, extracted_from=tuned.source, lora_rank=str(rank),
                    lora_alpha=f"{report.alpha:g}" if report.alpha else "rank", lora_targets=targets,
                    kept_norm_fraction=f"{report.kept:.6f}", covered_norm_fraction=f"{report.covered:.6f}")
    path = save_artifact(output, tensors, {**card, **extra})
    return f"{report.summary()}\nwrote {path}"


def _check_same_architecture(base, tuned) -> None:
    for component, module in base.components().items():
        theirs = tuned.components().get(component)
        ours_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()} if theirs is not None else {}
        if ours_shapes != their_shapes:
            raise SdtuneError(f"The tuned model's {component} has another architecture than the base's; "
                              "pass the model it was fine-tuned from as --base.")
