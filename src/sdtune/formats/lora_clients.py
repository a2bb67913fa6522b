"""How each client loads each LoRA file layout, read from its loader (see formats/clients.py for the verdicts).

Patterns match a layer's description "<component> <group> <module, '_'-joined> <algorithm>[ dora-out| dora-in]
[ scaled]" (lora_inspection.layer_descriptions; scaled: alpha is not the rank).
A1111 (extensions-builtin/Lora/networks.py) splits a key at its first '.', turns diffusers-style kohya names into
its LDM module names (or takes LDM names as they are) and skips, silently, what matches no module; its DoRA
(network.py) normalises per input feature. ComfyUI (comfy/lora.py model_lora_keys_unet/_clip, load_lora) maps
kohya names, `text_encoder(_2).text_model.encoder.layers.N.*`, and diffusers UNet names with attention spelled
`processor.to_*`; it reads alpha and dora_scale beside each layer only. Forge's LoRA loader is ComfyUI's
(packages_3rdparty/comfyui_lora_collection). kohya's networks/lora.py builds LoRA/LoCon modules inside
Transformer2DModel, ResnetBlock2D, Down/Upsample2D, CLIPAttention and CLIPMLP only and loads non-strictly.
diffusers' StableDiffusionLoraLoaderMixin converts kohya LoRA/LoCon/DoRA (lora_conversion_utils) and refuses
anything else, and refuses PEFT keys that do not all name LoRA parameters (sdtune's `.alpha`).
"""

from __future__ import annotations

from .clients import FULLY, Layers, Rule

_UNET_ATTENTION = Layers("UNet attention layers (read only as `processor.to_*`)", r"^unet attn ")
_NO_KOHYA_NAMES = "it matches only kohya names (lora_unet_…, lora_te_…); convert --to kohya"
_COMFY_DORA = Layers("per-output DoRA renormalised by the base weight's norm, close to DoRA while the update is small",
                     r" dora-out\b", "note")
_COMFY_SDTUNE = Rule(exceptions=(_UNET_ATTENTION, _COMFY_DORA, Layers(
    "text-encoder layers without `text_model.` (sdtune files from before it wrote that)",
    r"^text_encoder(_2)? \S+ (?!text_model_)")))
_COMFY_DIFFUSERS = Rule(exceptions=(
    _UNET_ATTENTION,
    Layers("layers applied at alpha = rank (their alpha is in the header, which it does not read)", r" scaled\b",
           "misapplies"),
    Layers("DoRA magnitudes (lora_magnitude_vector is not read)", r" dora-(in|out)\b", "misapplies")))
_LYCORIS_ONLY = r" (LoHa|LoKr|\S+-Tucker)\b"
KOHYA_CLIENTS = (
    ("a1111", Rule(exceptions=(Layers("per-output DoRA layers (A1111 normalises per input feature)", r" dora-out\b",
                                      "misapplies"),))),
    ("forge", Rule(exceptions=(_COMFY_DORA,))),
    ("comfyui", Rule(exceptions=(_COMFY_DORA,))),
    ("kohya", Rule(exceptions=(
        Layers("conv_in/conv_out (outside the blocks networks.lora wraps)",
               r"^unet \S+ (conv_in|conv_out|input_blocks_0_0|out_2) "),
        Layers("time-embedding MLP (outside the blocks networks.lora wraps)",
               r"^unet \S+ (time_embedding_linear_\d|time_embed_\d) "),
        Layers("LoHa/LoKr/Tucker layers (networks.lora holds LoRA and LoCon; use --network_module lycoris.kohya)",
               _LYCORIS_ONLY),
        Layers("DoRA magnitudes (networks.lora has none)", r" dora-(in|out)\b", "misapplies")))),
    ("diffusers", Rule(exceptions=(
        Layers("LoHa/LoKr/Tucker layers (its SD loader converts LoRA, LoCon and DoRA only)", _LYCORIS_ONLY, "refuses"),
        Layers("per-input DoRA (peft holds one magnitude per output feature)", r" dora-in\b", "refuses")))),
)
DIFFUSERS_CLIENTS = (
    ("a1111", Rule(refuses=_NO_KOHYA_NAMES)),
    ("forge", _COMFY_DIFFUSERS),
    ("comfyui", _COMFY_DIFFUSERS),
    ("kohya", Rule(refuses=_NO_KOHYA_NAMES)),
    ("diffusers", FULLY),
)
SDTUNE_CLIENTS = (
    ("a1111", Rule(refuses=_NO_KOHYA_NAMES)),
    ("forge", _COMFY_SDTUNE),
    ("comfyui", _COMFY_SDTUNE),
    ("kohya", Rule(refuses=_NO_KOHYA_NAMES)),
    ("diffusers", Rule(refuses="it refuses the `.alpha` keys; convert --to diffusers")),
)
