"""loralib-style LoRA on plain PyTorch models: an MLP and a two-layer transformer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sdtune.loralib as lora


class MLP(nn.Module):
    def __init__(self, r: int = 0):
        super().__init__()
        self.embed = lora.Embedding(50, 16, r=r) if r else nn.Embedding(50, 16)
        self.conv = lora.Conv2d(1, 4, 3, r=r, padding=1) if r else nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = lora.Linear(16 + 4 * 16, 32, r=r, lora_alpha=2 * r or 1) if r else nn.Linear(16 + 64, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, tokens, image):
        feats = torch.cat([self.embed(tokens).mean(1), self.conv(image).flatten(1)], 1)
        return self.fc2(torch.relu(self.fc1(feats)))


class TinyTransformer(nn.Module):
    def __init__(self, r: int = 0):
        super().__init__()
        linear = (lambda i, o: lora.Linear(i, o, r=r, lora_alpha=r)) if r else nn.Linear
        self.embed = nn.Embedding(30, 16)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q": linear(16, 16), "k": nn.Linear(16, 16), "v": linear(16, 16),
                           "ff": nn.Sequential(linear(16, 32), nn.GELU(), nn.Linear(32, 16))}) for _ in range(2))
        self.head = nn.Linear(16, 30)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            att = torch.softmax(b["q"](x) @ b["k"](x).transpose(1, 2) / 4, -1) @ b["v"](x)
            x = x + att
            x = x + b["ff"](x)
        return self.head(x)


def _inputs(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        return (torch.randint(0, 50, (8, 5), generator=g), torch.randn(8, 1, 4, 4, generator=g))
    return (torch.randint(0, 30, (8, 6), generator=g),)


@pytest.mark.parametrize("kind,cls", [("mlp", MLP), ("transformer", TinyTransformer)])
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_train_save_and_load_onto_a_fresh_pretrained_model(kind, cls, bias):
    torch.manual_seed(0)
    pretrained = cls().state_dict()
    model = cls(r=4)
    missing = model.load_state_dict(pretrained, strict=False)
    assert all("lora_" in k for k in missing.missing_keys) and not missing.unexpected_keys
    lora.mark_only_lora_as_trainable(model, bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or (bias != "none" and n.endswith("bias")) for n in trainable)
    inputs = _inputs(kind)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn_like(model(*inputs))
    for _ in range(5):
        optim.zero_grad()
        nn.functional.mse_loss(model(*inputs), target).backward()
        optim.step()
    for key, value in pretrained.items():  # frozen base weights are bit-identical
        if not key.endswith("bias") or bias == "none":
            assert torch.equal(model.state_dict()[key], value), key
    adapter = lora.lora_state_dict(model, bias=bias)
    assert all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "bias") for k in adapter)
    if bias == "none":
        assert not any(k.endswith("bias") for k in adapter)
    fresh = cls(r=4)
    fresh.load_state_dict(pretrained, strict=False)
    fresh.load_state_dict(adapter, strict=False)
    model.train(), fresh.train()
    assert torch.allclose(fresh(*inputs), model(*inputs), atol=1e-6)
    plain = cls()
    plain.load_state_dict(pretrained)
    assert not torch.allclose(plain(*inputs), model(*inputs), atol=1e-4), "the adapter learned nothing"


def test_eval_merges_and_train_restores_the_exact_weights():
    torch.manual_seed(1)
    model = MLP(r=4)
    for layer in (model.fc1, model.embed, model.conv):
        nn.init.normal_(layer.lora_B)
        nn.init.normal_(layer.lora_A)
    inputs = _inputs("mlp")
    base_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, lora.LORA_LAYERS)}
    unmerged = model.train()(*inputs)
    merged = model.eval()(*inputs)
    assert all(m.merged for m in model.modules() if isinstance(m, lora.LORA_LAYERS))
    assert not torch.equal(model.fc1.weight, base_weights["fc1"])
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    model.train()
    for name, module in model.named_modules():
        if isinstance(module, lora.LORA_LAYERS):
            assert torch.equal(module.weight, base_weights[name]) and not module.merged


def test_bad_bias_mode_is_refused():
    with pytest.raises(ValueError, match="bias"):
        lora.lora_state_dict(MLP(r=2), bias="some")
