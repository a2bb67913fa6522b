"""Load a single-file SD 1.x / 2.x / XL checkpoint (the civitai / original `.safetensors`/`.ckpt`) offline,
with no configuration folder: the architecture comes from the file (checkpoint_arch), the tokenizers from
CLIP's vocabulary that sdtune ships, and the weights through the same LDM name tables sdtune writes with.

Prediction type (epsilon or v), first that applies:
  1. the header says so: sdtune's run card `prediction_type`, SAI's `modelspec.prediction_type` or
     `modelspec.architecture` (e.g. stable-diffusion-v2-768-v);
  2. a `v_pred` marker tensor (what ComfyUI saves for v-prediction models) means v;
  3. SD 2.x only (other families are epsilon): an inpainting UNet (9 input channels) is epsilon; a .ckpt at
     global_step 875000 (the SD 2.0-base release) is epsilon (diffusers' rule); else ComfyUI's weight test:
     the last output block's first transformer norm1 bias has a standard deviation above 0.09 in v models;
     a file without that block (another UNet size) is taken as v, as diffusers does for SD 2.x.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import SdtuneError
from .formats.checkpoint import from_checkpoint
from .formats.lora import MODELSPEC_ARCH, MODELSPEC_PREDICTION
from .formats.ldm_names import LDM_UNET_PREFIX

V_PRED_MARKER = "v_pred"
SD2_BASE_GLOBAL_STEP = 875000
V_TEST_KEY = LDM_UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_TEST_STD = 0.09
_PREDICTIONS = ("epsilon", "v_prediction")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], int | None]:
    """(tensors, header metadata, global_step) of a .safetensors or .ckpt checkpoint, read safely."""
    from .artifacts import flatten_tensors, load_artifact

    obj, metadata = load_artifact(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning training checkpoints
        step = obj.get("global_step")
        return flatten_tensors(obj["state_dict"]), metadata, step if isinstance(step, int) else None
    return flatten_tensors(obj), metadata, None


def prediction_type(sd: dict[str, torch.Tensor], metadata: dict[str, str], family: str,
                    global_step: int | None = None) -> str:
    """epsilon or v_prediction, by the rule in this module's docstring."""
    said = _declared_prediction(metadata)
    if said:
        return said
    if V_PRED_MARKER in sd:
        return "v_prediction"
    if family != "sd2":
        return "epsilon"
    in_channels = sd[LDM_UNET_PREFIX + "input_blocks.0.0.weight"].shape[1]
    if in_channels != 4 or global_step == SD2_BASE_GLOBAL_STEP:
        return "epsilon"
    if V_TEST_KEY in sd:
        bias = sd[V_TEST_KEY].float()
        return "v_prediction" if torch.std(bias, unbiased=False) > V_TEST_STD else "epsilon"
    return "v_prediction"


def _declared_prediction(metadata: dict[str, str]) -> str | None:
    if metadata.get("prediction_type") in _PREDICTIONS:
        return metadata["prediction_type"]
    spec = {short: full for full, short in MODELSPEC_PREDICTION.items()}.get(metadata.get("modelspec.prediction_type"))
    if spec:
        return spec
    by_arch = {arch: prediction for (_, prediction), arch in MODELSPEC_ARCH.items()}
    return by_arch.get(metadata.get("modelspec.architecture", ""))


def _tokenizers(arch: dict, name: str) -> list:
    """CLIP's tokenizer per text encoder, padded as its family pads (OpenCLIP with "!", CLIP with EOS)."""
    from .formats.checkpoint import TEXT_LAYOUTS
    from .tokenizer_build import CLIP_VOCAB_SIZE, EOS, OPENCLIP_PAD, clip_tokenizer

    tokenizers = []
    for text, (_, _, layout) in zip(arch["text"], TEXT_LAYOUTS[arch["family"]]):
        if text["vocab_size"] != CLIP_VOCAB_SIZE:
            raise SdtuneError(f"{name}'s text encoder has {text['vocab_size']} tokens, not CLIP's {CLIP_VOCAB_SIZE}, "
                              "so sdtune has no tokenizer for it; pass --model-config with its diffusers folder.")
        tokenizers.append(clip_tokenizer(OPENCLIP_PAD if layout == "openclip" else EOS))
    return tokenizers


def load_checkpoint_file(path: Path, dtype: torch.dtype | None = None):
    """An SDModel from a single-file checkpoint, offline, with no configuration given."""
    from accelerate import init_empty_weights

    from .checkpoint_arch import SD2_EPSILON_SAMPLE_SIZE, detect_family, infer_architecture, matching_tiny
    from .model import SDModel, build_modules, make_scheduler, tiny_tokenizer
    from .model_configs import ARCHITECTURES

    sd, metadata, step = read_checkpoint(path)
    family = detect_family(sd, path.name)
    tiny = matching_tiny(sd, family)
    try:
        prediction = prediction_type(sd, metadata, family, step)
        arch = ARCHITECTURES[tiny] if tiny else infer_architecture(sd, family)
    except KeyError as exc:
        raise SdtuneError(f"{path.name} lacks the weight {exc.args[0]!r} that every {family} checkpoint has; "
                          "it is damaged or not a complete checkpoint.") from exc
    if tiny:  # miniature test models keep their own heads, sizes and tokenizer
        tokenizers = [tiny_tokenizer()] * len(arch["text"])
    else:
        if family == "sd2" and prediction == "epsilon":
            arch["unet"]["sample_size"] = SD2_EPSILON_SAMPLE_SIZE
        tokenizers = _tokenizers(arch, path.name)
    with init_empty_weights():  # parameters take the file's tensors; nothing is initialised twice
        unet, vae, encoders = build_modules(arch, tokenizers)
    scheduler = make_scheduler(arch["scheduler"], prediction)
    model = SDModel(family, prediction, unet, vae, encoders, tokenizers, scheduler, str(path))
    parts, target = model.components(), dtype or torch.float32
    for component, weights in from_checkpoint(sd, model).items():
        weights = {k: v.to(target) if v.is_floating_point() else v for k, v in weights.items()}
        try:
            result = parts[component].load_state_dict(weights, strict=False, assign=True)
        except RuntimeError as exc:  # a shape that contradicts the others
            raise SdtuneError(f"{path.name}: its {component} weights do not fit one architecture "
                              f"({str(exc).splitlines()[-1].strip()}).") from exc
        if result.unexpected_keys:
            raise SdtuneError(f"{path.name}: weight {component}.{result.unexpected_keys[0]} does not fit the "
                              "architecture read from the file.")
    for module in parts.values():
        module.eval()
    return model
