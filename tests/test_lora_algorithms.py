"""`--algo`'s shared training path: LoRA+ gives each algorithm's output-side factors (LoRA's B, LoHa's w*_a, split
LoKr factors' w*_a) the larger step and nothing else."""

from __future__ import annotations

import pytest

from sdtune.methods.lora import TRAIN_ADAPTER, LoRA, LoRAConfig
from sdtune.model import load

# id -> (settings, the matrices LoRA+ speeds up); LoKr at factor 8 and rank 2 splits both factors of the wider
# layers and leaves full ones elsewhere.
CASES = {
    "lora": ({}, {"lora_B"}),
    "loha": ({"algo": "loha"}, {"hada_w1_a", "hada_w2_a"}),
    "lokr": ({"algo": "lokr", "lokr_factor": 8, "rank": 2, "lokr_decompose_both": True}, {"lokr_w1_a", "lokr_w2_a"}),
}


def _matrix(name: str) -> str:
    """The adapter matrix a peft parameter belongs to (`...to_q.lora_B.sdtune.weight` -> lora_B)."""
    parts = name.split(".")
    return parts[parts.index(TRAIN_ADAPTER) - 1]


@pytest.mark.parametrize("case", CASES)
def test_loraplus_speeds_up_the_output_side_factors_only(case):
    settings, faster = CASES[case]
    model = load("tiny:sd1")
    groups = LoRA(LoRAConfig(targets="attn,conv", loraplus_ratio=4.0, **settings)).setup(model)
    names = {id(p): n for n, p in model.unet.named_parameters()}
    sped = {_matrix(names[id(p)]) for g in groups if g.get("lr_factor") == 4.0 for p in g["params"]}
    rest = {_matrix(names[id(p)]) for g in groups if "lr_factor" not in g for p in g["params"]}
    assert sped == faster and rest and not rest & faster, (sped, rest)
