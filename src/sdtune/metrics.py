"""Quality metrics for real models, as the DreamBooth paper defines them, built on transformers encoders.

- DINO    mean cosine similarity of generated images to the real subject images, in DINO ViT CLS space.
- CLIP-I  the same in CLIP image space.
- CLIP-T  cosine similarity of each image to its prompt in CLIP space.
- subject_distance  1 - PRES: how unlike the subject the class-prompt images are (DINO space).
- distinctness  1 - mean cosine between images of the same prompt: diversity (the paper uses LPIPS).
Each is an Estimate (value, 95% bootstrap interval) over per-image scores, like the toy-world metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import SdtuneError
from .toyworld.metrics import Estimate, bootstrap_mean

KINDS = ("clip", "dino")


class Encoder:
    """A CLIP or DINO model that embeds images (and, for CLIP, texts) as unit vectors."""

    def __init__(self, kind: str, model, processor):
        self.kind, self.model, self.processor = kind, model.eval(), processor

    @torch.no_grad()
    def images(self, images, batch: int = 32) -> torch.Tensor:
        """Unit embeddings [N, D] of PIL images or uint8 arrays [N,H,W,3]."""
        from PIL import Image

        pil = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
        out = []
        for start in range(0, len(pil), batch):
            pixels = self.processor(images=pil[start: start + batch], return_tensors="pt")["pixel_values"]
            if self.kind == "clip":
                out.append(_pooled(self.model.get_image_features(pixel_values=pixels)))
            else:
                out.append(self.model(pixel_values=pixels).last_hidden_state[:, 0])  # DINO's CLS token
        return _unit(torch.cat(out).float())

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit embeddings [N, D] of texts (CLIP only)."""
        if self.kind != "clip":
            raise SdtuneError("Only a CLIP model embeds texts; pass a CLIP model to --clip-model.")
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        return _unit(_pooled(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                          attention_mask=tokens.get("attention_mask"))).float())


def _pooled(output) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 returns them as the output's pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def load_encoder(kind: str, spec: str) -> Encoder:
    """A CLIP (`kind="clip"`) or DINO ViT (`kind="dino"`) model from a local folder or a hub id."""
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

    if kind not in KINDS:
        raise SdtuneError(f"Unknown encoder kind '{kind}'; use one of {', '.join(KINDS)}.")
    try:
        if kind == "clip":
            return Encoder(kind, CLIPModel.from_pretrained(spec), AutoProcessor.from_pretrained(spec))
        return Encoder(kind, AutoModel.from_pretrained(spec), AutoImageProcessor.from_pretrained(spec))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        flag = "--clip-model" if kind == "clip" else "--dino-model"
        raise SdtuneError(f"Could not load the {kind.upper()} model '{spec}' ({str(exc).splitlines()[0]}); "
                          f"pass a local folder to {flag}.") from exc


def image_similarity(generated: torch.Tensor, references: torch.Tensor) -> Estimate:
    """Per generated image, its mean cosine similarity to the reference images (DINO, CLIP-I)."""
    return bootstrap_mean((generated @ references.T).mean(dim=1).tolist())


def subject_distance(class_images: torch.Tensor, references: torch.Tensor) -> Estimate:
    """Per class-prompt image, 1 - its mean cosine similarity to the subject's images (1 - PRES: higher means
    the class word still means the class, not the subject)."""
    return bootstrap_mean((1.0 - class_images @ references.T).mean(dim=1).tolist())


def text_similarity(images: torch.Tensor, texts: torch.Tensor) -> Estimate:
    """Per image, the cosine similarity to its own prompt's embedding (row i of `texts`) (CLIP-T)."""
    return bootstrap_mean((images * texts).sum(dim=1).tolist())


def distinctness(embeddings: torch.Tensor, groups: Sequence) -> Estimate:
    """Per image, 1 - its mean cosine similarity to the other images of its group; images alone in their
    group are left out (diversity: groups are prompts)."""
    sims = embeddings @ embeddings.T
    keys = list(groups)
    scores = []
    for i, key in enumerate(keys):
        others = [j for j, other in enumerate(keys) if other == key and j != i]
        if others:
            scores.append(1.0 - float(sims[i, others].mean()))
    return bootstrap_mean(scores)
