"""Textual Inversion: learn N vectors for a new word in each text encoder; every model weight stays frozen.

Training adds the token's names to the tokenizer(s) and swaps each encoder's token embedding for a
`NewTokenEmbedding`: old ids read the frozen table, new ids read a small fp32 parameter [N, D], the only
values that train (the 49,408-row table gets no gradient and no optimizer state, whatever its dtype).
Inference resizes the table and writes the vectors into the new rows, as diffusers' load_textual_inversion
does, so the stock pipelines expand a multi-vector token to "tok tok_1 ... tok_{N-1}".
Canonical state: {"text_encoder": [N, D]} plus "text_encoder_2" on SDXL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import opt
from ..errors import SdtuneError
from ..formats.embeddings import (COMPONENT_OF_KEY, LAYOUT_NAMES, LAYOUTS, SDXL_KEYS, SUFFIX, Embedding, detect,
                                  file_names, read_embedding, write_embedding)
from . import CompareRow, Method

# Prompt templates by learnable property, in plain words; {token} is the new word.
TEMPLATES: dict[str, list[str]] = {
    "object": [
        "a photo of a {token}", "a picture of the {token}", "a close-up photo of the {token}",
        "a bright photo of a {token}", "a dark photo of the {token}", "a small {token} in a photo",
        "a large {token} in a picture", "a good photo of one {token}", "an image of my {token}",
        "a cropped photo of the {token}", "the {token} on a table", "a clean {token} in the picture",
    ],
    "style": [
        "a painting in the style of {token}", "a picture in the style of {token}",
        "a drawing in the style of {token}", "an artwork in the style of {token}",
        "a small painting in the style of {token}", "a large picture in the style of {token}",
        "a landscape in the style of {token}", "a portrait in the style of {token}",
        "a sketch in the style of {token}", "a still life in the style of {token}",
        "a {token} style painting", "a picture painted in {token} style",
    ],
}
# Likely base model of a vector width (for refusing embeddings made for another model).
WIDTH_FAMILY: dict[int, str] = {768: "SD 1.x (or SDXL's clip_l)", 1024: "SD 2.x", 1280: "SDXL's clip_g"}
ALIAS = "<sdtune-vector-{}>"  # training-only names of the vectors, used in expanded templates


TOKEN_SETTING = "--token, or Token in the web UI"  # where users set it, named in the errors
NEW_WORD = "<{token}>"  # the subject's word ({token}) as one the tokenizer does not know yet
CLASS_WORD = "{class_word}"  # in --init-word: the subject's class word


@dataclass
class TextualInversionConfig:
    """Textual Inversion's own settings (the token is --token)."""

    init_word: str = opt("*", "a word that is ONE token for the base model; the vectors start from its embedding "
                              "({class_word}: the subject's class word)")
    vectors: int = opt(1, "vectors learned for the token (each takes one place in the 77-token prompt)",
                       min=1, max=64)
    learnable_property: str = opt("object", "what the token stands for; picks the prompt templates",
                                  choices=tuple(TEMPLATES), flag="property")
    caption: str = opt("", "your own prompt template with {token} (and optionally {class_word}), "
                           "used instead of the built-in templates")
    format: str = opt("sdtune", "file layout written (a1111: .pt)", choices=LAYOUT_NAMES)


def vector_names(token: str, count: int) -> list[str]:
    """The names a token's vectors get in a tokenizer, diffusers' convention: tok, tok_1, ... (lower case,
    as CLIP's tokenizer matches them, so diffusers' pipelines find them to expand a prompt)."""
    base = token.lower()
    return [base] + [f"{base}_{i}" for i in range(1, count)]


class NewTokenEmbedding(torch.nn.Module):
    """Token embedding whose ids from `first_id` on read trainable vectors; older ids read the frozen table.
    Id first_id + k reads vector k % N, so a token's names and its template aliases share the vectors."""

    def __init__(self, table: torch.nn.Embedding, first_id: int, init: torch.Tensor):
        super().__init__()
        self.table = table  # registered first, so the encoder's dtype stays the table's
        self.added = torch.nn.Embedding.from_pretrained(init.detach().float().clone(), freeze=False)
        self.first_id = first_id

    @property
    def weight(self) -> torch.Tensor:
        """The frozen table, for code that reads the input embedding's width or dtype."""
        return self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of `ids` in the table's dtype; gradients reach only the new vectors."""
        new = ids >= self.first_id
        base = self.table(torch.where(new, torch.zeros_like(ids), ids))
        slots = (ids - self.first_id).clamp(min=0) % self.added.num_embeddings
        return torch.where(new.unsqueeze(-1), self.added(slots).to(base.dtype), base)


def text_encoders(model) -> list[tuple[str, torch.nn.Module, object]]:
    """(component, encoder, tokenizer) per text encoder."""
    return [(f"text_encoder{'_2' if i else ''}", enc, tok)
            for i, (enc, tok) in enumerate(zip(model.text_encoders, model.tokenizers))]


def _unique_tokenizers(model) -> list:
    """Tokenizers by identity (a model may share one object between its encoders)."""
    return list({id(tok): tok for tok in model.tokenizers}.values())


def _ids(tokenizer, word: str) -> list[int]:
    return tokenizer.encode(word, add_special_tokens=False)


def _add_tokens(tokenizers: list, names: list[str]) -> None:
    """Add `names` as whole tokens and check each now reads as exactly that one token."""
    for tokenizer in tokenizers:
        tokenizer.add_tokens(names)
        for name in names:
            if _ids(tokenizer, name) != [tokenizer.convert_tokens_to_ids(name)]:
                raise SdtuneError(f"The tokenizer cannot read '{name}' as one word; use a token without spaces.")


def check_fits(model, vectors: dict[str, torch.Tensor], name: str) -> None:
    """Refuse an embedding made for another model, naming both widths and the likely base family, or one with
    more vectors than a prompt chunk has tokens (no prompt can use it; adding them all would stall the tokenizer)."""
    chunk = model.tokenizer.model_max_length - 2  # 75 for CLIP: the start and end tokens take two places
    count = next(iter(vectors.values())).shape[0]
    if count > chunk:
        raise SdtuneError(f"Embedding '{name}' has {count:,} vectors, more than the {chunk} tokens of a prompt "
                          "chunk, so no prompt can use it; remove the file or rename it so no prompt word names it.")
    widths = {c: enc.get_input_embeddings().weight.shape[1] for c, enc, _ in text_encoders(model)}
    if set(vectors) == set(widths):
        for component, tensor in vectors.items():
            if tensor.shape[-1] != widths[component]:
                where = f" ({SDXL_KEYS[component]})" if len(widths) > 1 else ""
                raise SdtuneError(
                    f"Embedding '{name}' has {tensor.shape[-1]}-wide vectors{where}, likely made for "
                    f"{WIDTH_FAMILY.get(tensor.shape[-1], 'another model')}, but this {model.family} model's "
                    f"text encoder is {widths[component]} wide; use an embedding made for this base model.")
        return
    if len(vectors) > 1:
        raise SdtuneError(f"Embedding '{name}' holds clip_l/clip_g vectors (an SDXL embedding), but this "
                          f"{model.family} model has one {widths['text_encoder']}-wide text encoder.")
    width = next(iter(vectors.values())).shape[-1]
    raise SdtuneError(f"Embedding '{name}' holds one set of {width}-wide vectors, likely made for "
                      f"{WIDTH_FAMILY.get(width, 'another model')}, but this SDXL model needs clip_l and clip_g "
                      f"vectors ({widths['text_encoder']} and {widths['text_encoder_2']} wide).")


class TextualInversion(Method):
    """The Textual Inversion method (see module docstring)."""

    name = "textual-inversion"
    label = "Textual Inversion"
    config_class = TextualInversionConfig
    default_lr = 5e-4
    layouts = LAYOUTS
    found_by_name = True  # A1111's convention: a prompt applies an embedding by writing its name
    file_noun = "embedding"
    token_template = NEW_WORD
    converts = True
    a1111_hash_field = "TI hashes"
    # builtin: measured on the builtin model (BENCHMARKS.md).
    compare_rows = (CompareRow("textual-inversion", "#2ca02c", {
        "builtin": {"token": NEW_WORD, "train": {"steps": 300, "lr": 5.0e-2, "batch_size": 4},
                    "textual-inversion": {"init_word": "{class_word}"}},
        "real": {"token": NEW_WORD, "train": {"steps": 3000, "lr": 5.0e-3, "batch_size": 1}},
    }),)

    def __init__(self, cfg: TextualInversionConfig | None = None, token: str = ""):
        self.cfg = cfg or TextualInversionConfig()
        self.token = token
        self.init_word = self.cfg.init_word  # {class_word} filled in by check_data

    # Training -----------------------------------------------------------------------------------------------
    def check_data(self, model, data_cfg) -> None:
        """Take the subject's token (--token; the loop calls this before setup) and refuse prompt settings
        that could not train every vector."""
        self.token = data_cfg.token
        if self.cfg.caption and "{token}" not in self.cfg.caption:
            raise SdtuneError("--caption must contain {token}, where the new word goes.")
        if CLASS_WORD in self.cfg.init_word:
            if not data_cfg.class_word:
                raise SdtuneError(f"--init-word {self.cfg.init_word} starts from the class word: give --class-word.")
            self.init_word = self.cfg.init_word.replace(CLASS_WORD, data_cfg.class_word)

    def setup(self, model) -> list[torch.nn.Parameter]:
        """Freeze the model, add the token's names to the tokenizer(s), return the new vectors (one [N, D]
        parameter per text encoder, initialised from --init-word), the only values that train."""
        token, count = self.token, self.cfg.vectors
        if not token:
            raise SdtuneError(f"Textual Inversion needs a token ({TOKEN_SETTING}), a new word such as <my-thing>.")
        if token != token.strip() or len(token.split()) != 1:
            raise SdtuneError(f"The token '{token}' ({TOKEN_SETTING}) must be one new word without spaces, "
                              "e.g. <my-thing>.")
        for module in model.components().values():
            module.requires_grad_(False)
        names = vector_names(token, count) + ([ALIAS.format(i) for i in range(count)] if count > 1 else [])
        encoders = text_encoders(model)
        init_ids = {}
        for component, _, tokenizer in encoders:
            ids = _ids(tokenizer, self.init_word)
            if len(ids) != 1:
                raise SdtuneError(f"--init-word '{self.init_word}' became {len(ids)} tokens for this model's "
                                  "tokenizer; Textual Inversion starts from one token, so pick a single common word.")
            init_ids[component] = ids[0]
            for name in names:
                if len(_ids(tokenizer, name)) == 1:
                    raise SdtuneError(f"'{name}' is already a token of this model's vocabulary; pick a new word "
                                      f"as the token ({TOKEN_SETTING}), e.g. <{token.strip('<>')}-1>.")
        _add_tokens(_unique_tokenizers(model), names)
        params = []
        for component, encoder, tokenizer in encoders:
            first = tokenizer.convert_tokens_to_ids(names[0])
            if tokenizer.convert_tokens_to_ids(names) != list(range(first, first + len(names))):
                raise SdtuneError("The tokenizer gave the new token's names scattered ids; use a fresh model.")
            table = encoder.get_input_embeddings()
            init = table.weight[init_ids[component]].detach().float().expand(count, -1)
            module = NewTokenEmbedding(table, first, init)
            encoder.set_input_embeddings(module)
            params.append(module.added.weight)
        return params

    def prompt_templates(self, model) -> list[str]:
        """Training prompts: --caption, else the base model's own templates, else the built-in ones; for
        several vectors, {token} is spelled out as one alias per vector."""
        if self.cfg.caption:
            templates = [self.cfg.caption]
        else:
            own = model.extras.get("ti_templates")
            if isinstance(own, dict):
                own = own.get(self.cfg.learnable_property)
            templates = list(own or TEMPLATES[self.cfg.learnable_property])
        return [t.replace("{token}", self.prompt_token("{token}")) for t in templates]

    def prompt_token(self, token: str) -> str:
        """Several vectors: one alias per vector, so every vector is in every training prompt (captions too)."""
        return " ".join(ALIAS.format(i) for i in range(self.cfg.vectors)) if self.cfg.vectors > 1 else token

    def _trained(self, model) -> dict[str, NewTokenEmbedding]:
        found = {c: enc.get_input_embeddings() for c, enc, _ in text_encoders(model)}
        return {c: m for c, m in found.items() if isinstance(m, NewTokenEmbedding)}

    def state_dict(self, model) -> dict[str, torch.Tensor]:
        """The trained vectors by text-encoder component, fp32 copies."""
        return {c: m.added.weight.detach().to("cpu", torch.float32).clone() for c, m in self._trained(model).items()}

    def load_state_dict(self, model, state: dict[str, torch.Tensor]) -> None:
        """Put checkpointed vectors back after `setup` (resume)."""
        modules = self._trained(model)
        for component, tensor in state.items():
            if component not in modules or modules[component].added.weight.shape != tensor.shape:
                raise SdtuneError(f"Checkpoint does not fit this Textual Inversion setup ({component}).")
            with torch.no_grad():
                modules[component].added.weight.copy_(tensor)

    def metadata(self) -> dict[str, str]:
        return {"token": self.token, "vectors": str(self.cfg.vectors), "init_word": self.init_word,
                "property": self.cfg.learnable_property, "caption": self.cfg.caption}

    def usage(self, model: str, out_dir: Path, name: str, token: str) -> str:
        return f'--model {model} --artifacts {out_dir} --prompt "a {token} ..."'

    def client_usage(self, path: Path) -> str:
        """How to use the written file in AUTOMATIC1111 and ComfyUI: both name an embedding by its file name,
        which is the token only where the token is a valid file name (`<zwx>` is saved as `_zwx_`)."""
        word = Path(path).stem
        return (f"in AUTOMATIC1111: copy {Path(path).name} into stable-diffusion-webui/embeddings and write "
                f"{word} in the prompt (in ComfyUI: embedding:{word})")

    def output_files(self, name: str, fmt: str | None = None) -> list[str]:
        """What `save` writes into the output folder."""
        return [f"{name}{SUFFIX.get(fmt or self.cfg.format, '.safetensors')}"]

    def save(self, model, out_dir: Path, name: str, card: dict[str, str], fmt: str | None = None) -> list[Path]:
        emb = Embedding(self.token, self.state_dict(model), dict(card))
        return [write_embedding(Path(out_dir) / self.output_files(name, fmt)[0], emb, fmt or self.cfg.format)]

    # Inference ----------------------------------------------------------------------------------------------
    def apply(self, model, state: dict[str, torch.Tensor], weight: float = 1.0, name: str = "") -> None:
        """Add `name` (and name_1 ... for more vectors) to the tokenizer(s) and write the vectors into new
        rows of each text encoder's table, as diffusers' load_textual_inversion does."""
        check_fits(model, state, name)
        names = vector_names(name, next(iter(state.values())).shape[0])
        tokenizers = _unique_tokenizers(model)
        if any(n in tok.added_tokens_encoder for tok in tokenizers for n in names):
            raise SdtuneError(f"An embedding named '{name}' is already loaded; give the files different names.")
        _add_tokens(tokenizers, names)
        for component, encoder, tokenizer in text_encoders(model):
            ids = tokenizer.convert_tokens_to_ids(names)
            if encoder.get_input_embeddings().weight.shape[0] <= max(ids):
                encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
            table = encoder.get_input_embeddings().weight
            vectors = state[component] if weight == 1.0 else state[component] * weight
            with torch.no_grad():
                table[ids] = vectors.to(table.device, table.dtype)

    def decode_file(self, model, obj, metadata: dict[str, str], path: Path) -> dict[str, torch.Tensor]:
        """An embedding file in any layout sdtune reads -> canonical state for this model (or a clear refusal)."""
        emb = read_embedding(obj, metadata, Path(path).stem)
        check_fits(model, emb.vectors, emb.token)
        return emb.vectors

    def describe(self, state: dict[str, torch.Tensor]) -> str:
        count = next(iter(state.values())).shape[0]
        return f"{count} vector{'' if count == 1 else 's'}"

    @classmethod
    def prompt_words(cls, path: Path) -> list[str]:
        return file_names(path)

    @classmethod
    def client_layers(cls, shapes: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> list[str]:
        """The file is one embedding; an SDXL one holds a vector set per text encoder (clip_l, clip_g)."""
        sdxl = any(key.split(".")[-1] in COMPONENT_OF_KEY for key, _ in shapes)
        return ["embedding sdxl" if sdxl else "embedding"]

    @classmethod
    def recognises(cls, obj, metadata: dict[str, str]) -> bool:
        """Whether a loaded file is an embedding (and not another method's artifact)."""
        return metadata.get("method", cls.name) == cls.name and detect(obj) is not None

    @classmethod
    def convert(cls, obj, metadata: dict[str, str], src: Path, dst: Path, to: str, model_spec: str | None) -> Path:
        """Re-encode an embedding in another layout; the token and run card travel along."""
        emb = read_embedding(obj, metadata, Path(src).stem)
        if model_spec:
            from ..model import load

            check_fits(load(model_spec), emb.vectors, emb.token)
        return write_embedding(Path(dst), emb, to)
