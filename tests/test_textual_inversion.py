"""Textual Inversion: only the new vectors train, file layouts round-trip bit-exactly, bad inputs are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdtune import conditioning
from sdtune.artifacts import load_artifact
from sdtune.cli import main
from sdtune.config import DataConfig, TrainConfig
from sdtune.errors import SdtuneError
from sdtune.formats.embeddings import Embedding, file_names, read_embedding, write_embedding
from sdtune.methods.textual_inversion import TextualInversion, TextualInversionConfig
from sdtune.model import load
from sdtune.train import train


def _method(vectors=1, token="<cat-toy>", **kw):
    cfg = TextualInversionConfig(init_word="toy", vectors=vectors, **kw)
    method = TextualInversion(cfg)
    method.check_data(None, DataConfig(token=token))
    return method, cfg


def test_only_the_new_vectors_train(subject_dir, tmp_path):
    model = load("tiny:sd1")
    before = {f"{c}.{k}": v.clone() for c, m in model.components().items() for k, v in m.state_dict().items()}
    method, cfg = _method(vectors=2)
    result = train(model, method, TrainConfig(steps=4, lr=5e-2, checkpoint_every=2, log_dir="none"),
                   DataConfig(images=str(subject_dir), token="<cat-toy>"), tmp_path, "cat", progress=False)
    width = model.text_encoder.config.hidden_size
    # The whole table (every existing row) and every other weight are bit-identical after training.
    table = model.text_encoder.get_input_embeddings().table
    assert table.weight.grad is None and not table.weight.requires_grad
    assert torch.equal(table.weight, before["text_encoder.embeddings.token_embedding.weight"])
    for component, module in model.components().items():
        for key, value in module.state_dict().items():
            key = key.replace("token_embedding.table.", "token_embedding.")
            if "token_embedding.added" not in key:
                assert torch.equal(value, before[f"{component}.{key}"]), key
    # The optimizer held exactly N x width trainable values (and state for nothing else).
    saved = torch.load(tmp_path / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=True)
    state = saved["optimizer"]["state"]
    assert [len(g["params"]) for g in saved["optimizer"]["param_groups"]] == [1]
    assert sum(s["exp_avg"].numel() for s in state.values()) == 2 * width == result.trainable_params
    # The vectors moved away from the init word's row.
    vectors, _ = load_artifact(result.paths[0])
    init = before["text_encoder.embeddings.token_embedding.weight"][model.tokenizer.convert_tokens_to_ids("toy</w>")]
    assert vectors["<cat-toy>"].shape == (2, width)
    assert (vectors["<cat-toy>"] - init).abs().max() > 1e-3
    # Resuming from the step-2 checkpoint puts the vectors back and ends bit-identical.
    method, cfg = _method(vectors=2)
    resumed = train(load("tiny:sd1"), method,
                    TrainConfig(steps=4, lr=5e-2, resume=str(tmp_path / "checkpoints" / "step-000002"),
                                log_dir="none"),
                    DataConfig(images=str(subject_dir), token="<cat-toy>"), tmp_path / "resumed", "cat",
                    progress=False)
    assert torch.equal(load_artifact(resumed.paths[0])[0]["<cat-toy>"], vectors["<cat-toy>"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vectors_train_in_fp32_beside_a_half_precision_encoder(dtype):
    model = load("tiny:sdxl")
    for encoder in model.text_encoders:
        encoder.to(dtype)
    method, cfg = _method(vectors=3)
    params = method.setup(model)
    assert [tuple(p.shape) for p in params] == [(3, 32), (3, 32)]  # one set per SDXL text encoder
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert all(enc.dtype == dtype for enc in model.text_encoders)
    prompts = method.prompt_templates(model)[:2]
    prompts = [p.replace("{token}", "<cat-toy>") for p in prompts]
    cond = conditioning.encode(model, prompts)
    assert cond.hidden_states.dtype == dtype
    cond.hidden_states.float().square().mean().backward()
    for param in params:
        assert param.grad is not None and param.grad.dtype == torch.float32
        assert (param.grad.abs().sum(dim=1) > 0).all(), "every vector gets a gradient"
    tables = [enc.get_input_embeddings().table.weight for enc in model.text_encoders]
    assert all(t.grad is None for t in tables)


def test_prompt_templates(tmp_path):
    model = load("tiny:sd1")
    method, _ = _method(vectors=1, learnable_property="style")
    assert all("{token}" in t and "style" in t for t in method.prompt_templates(model))
    model.extras["ti_templates"] = {"object": ["a {token} toy"], "style": ["{token} art"]}
    assert method.prompt_templates(model) == ["{token} art"]
    caption, _ = _method(vectors=2, caption="my {token} thing")
    assert caption.prompt_templates(model) == ["my <sdtune-vector-0> <sdtune-vector-1> thing"]


def test_several_vectors_all_learn_from_captions(tmp_path, subject_dir):
    """Captions' {token} spells out every vector (as the method's templates do), so with --use-captions each
    vector is in every prompt and learns; the init word can be the subject's class word."""
    folder = subject_dir
    for i, image in enumerate(sorted(folder.glob("*.png"))):
        image.with_suffix(".txt").write_text(f"a {{token}} {{class_word}} number {i}")
    model = load("tiny:sd1")
    method = TextualInversion(TextualInversionConfig(init_word="{class_word}", vectors=3))
    table = model.text_encoder.get_input_embeddings().weight.detach().clone()
    result = train(model, method, TrainConfig(steps=3, lr=5e-2, log_dir="none"),
                   DataConfig(images=str(folder), token="<cat-toy>", class_word="toy", use_captions=True),
                   tmp_path / "out", "cat", progress=False)
    vectors = load_artifact(result.paths[0])[0]["<cat-toy>"]
    start = table[model.tokenizer.convert_tokens_to_ids("toy</w>")]
    assert method.init_word == "toy"
    assert ((vectors - start).abs().amax(dim=1) > 1e-3).all(), "every vector moved from the class word's row"
    with pytest.raises(SdtuneError, match="--class-word"):
        TextualInversion(TextualInversionConfig(init_word="{class_word}")).check_data(model, DataConfig(token="<t>"))
    with pytest.raises(SdtuneError, match="must contain"):
        _method(caption="no token here")


# Formats ----------------------------------------------------------------------------------------------------

def _vectors(n=2, width=32, dtype=torch.float32, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("sdxl", [False, True])
def test_round_trips_are_bit_exact(tmp_path, sdxl):
    vectors = {"text_encoder": _vectors(3, dtype=torch.float16)}
    if sdxl:
        vectors["text_encoder_2"] = _vectors(3, 48, torch.bfloat16, seed=1)
    card = {"method": "textual-inversion", "steps": "40", "base_hash": "abc", "base_model": "tiny:sd1"}
    first = write_embedding(tmp_path / "cat-toy.safetensors", Embedding("<cat-toy>", vectors, card), "sdtune")
    pt = tmp_path / "pt" / "cat-toy.pt"
    assert main(["convert", str(first), str(pt), "--to", "a1111"]) == 0
    back = tmp_path / "back" / "cat-toy.safetensors"
    assert main(["convert", str(pt), str(back), "--to", "sdtune"]) == 0
    for path in (first, pt, back):
        obj, meta = load_artifact(path)
        emb = read_embedding(obj, meta, path.stem)
        assert emb.vectors.keys() == vectors.keys()
        for key, value in vectors.items():
            assert emb.vectors[key].dtype == value.dtype and torch.equal(emb.vectors[key], value)
        assert emb.token == ("cat-toy" if sdxl and path != first else "<cat-toy>")  # SDXL .pt: no name
    _, meta_first = load_artifact(first)
    _, meta_back = load_artifact(back)
    assert meta_back == meta_first or sdxl  # an SDXL .pt holds only clip_l/clip_g (all A1111 reads)
    if not sdxl:
        obj, _ = load_artifact(pt)
        assert obj["name"] == "<cat-toy>" and obj["string_to_token"] == {"*": 265}
        assert obj["step"] == 40 and obj["sd_checkpoint"] == "abc" and obj["sd_checkpoint_name"] == "tiny:sd1"


def test_a1111_pt_round_trips_through_safetensors(tmp_path):
    original = {"string_to_token": {"*": 265}, "string_to_param": {"*": _vectors(4, 768, torch.float16)},
                "name": "charturner", "step": 500, "sd_checkpoint": "ab12cd34", "sd_checkpoint_name": "v1-5"}
    torch.save(original, tmp_path / "charturner.pt")
    assert main(["convert", str(tmp_path / "charturner.pt"), str(tmp_path / "st" / "charturner.safetensors"),
                 "--to", "kohya"]) == 0
    tensors, meta = load_artifact(tmp_path / "st" / "charturner.safetensors")
    assert list(tensors) == ["emb_params"] and meta["textual-inversion_token"] == "charturner"
    assert main(["convert", str(tmp_path / "st" / "charturner.safetensors"), str(tmp_path / "again.pt")]) == 0
    again, _ = load_artifact(tmp_path / "again.pt")
    for key in ("string_to_token", "name", "step", "sd_checkpoint", "sd_checkpoint_name"):
        assert again[key] == original[key], key
    assert torch.equal(again["string_to_param"]["*"], original["string_to_param"]["*"])
    assert again["string_to_param"]["*"].dtype == torch.float16


def test_token_is_metadata_else_stem_and_names_in_folders(tmp_path):
    save_file({"emb_params": _vectors(1)}, tmp_path / "easyneg.safetensors")
    save_file({"<tok>": _vectors(1)}, tmp_path / "learned_embeds.safetensors")
    save_file({"a.lora_down.weight": _vectors(1), "a.lora_up.weight": _vectors(1)}, tmp_path / "dog.safetensors")
    torch.save({"clip_l": _vectors(1), "clip_g": _vectors(1)}, tmp_path / "xl.pt")
    obj, meta = load_artifact(tmp_path / "easyneg.safetensors")
    assert read_embedding(obj, meta, "easyneg").token == "easyneg"
    assert file_names(tmp_path / "easyneg.safetensors") == ["easyneg"]
    assert file_names(tmp_path / "learned_embeds.safetensors") == ["<tok>", "learned_embeds"]
    assert file_names(tmp_path / "dog.safetensors") == []  # a LoRA is no embedding, whatever its stem
    assert file_names(tmp_path / "xl.pt") == ["xl"]
    assert not TextualInversion.recognises(*load_artifact(tmp_path / "dog.safetensors"))


# Generation -------------------------------------------------------------------------------------------------

def _image(model_dir, prompt, folder, out):
    from PIL import Image

    assert main(["generate", "--model", str(model_dir), "--prompt", prompt, "--artifacts", str(folder),
                 "--steps", "2", "--seed", "1", "--guidance", "7.5", "--output", str(out)]) == 0
    return np.asarray(Image.open(out), dtype=np.float32) / 255


def test_several_embeddings_in_one_prompt_match_diffusers(tiny_pipeline_dirs, tmp_path):
    from diffusers import DiffusionPipeline

    model_dir = tiny_pipeline_dirs["sd1"]
    folder = tmp_path / "emb"
    folder.mkdir()
    save_file({"emb_params": _vectors(2, seed=3) * 0.3}, folder / "shiny.safetensors")
    torch.save({"string_to_param": {"*": _vectors(3, seed=4) * 0.3}, "name": "zigzag"}, folder / "zigzag.pt")
    # A LoRA and a hypernetwork-like pickle whose stems are words of the prompt are not embeddings.
    save_file({"a.lora_down.weight": _vectors(1), "a.lora_up.weight": _vectors(1)}, folder / "photo.safetensors")
    torch.save({32: [{"linear.weight": _vectors(1)}], "name": "of"}, folder / "of.pt")
    prompt = "a photo of Shiny on zigzag"
    ours = _image(model_dir, prompt, folder, tmp_path / "ours.png")
    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(folder / "shiny.safetensors"), token="shiny")
    pipe.load_textual_inversion(str(folder / "zigzag.pt"))
    theirs = pipe("a photo of shiny on zigzag", num_inference_steps=2, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(1)).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=np.float32) / 255).max() <= 1 / 255 + 1e-6


# Bad inputs: one line on stderr, no traceback, exit != 0, nothing written -------------------------------------

def _fails(capsys, argv, *fragments):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _train_argv(images, out, *extra):
    return ["train", "textual-inversion", "--model", "tiny:sd1", "--images", str(images), "--steps", "1",
            "--output", str(out), "--quiet", "--log-dir", "none", *extra]


def test_multi_token_init_word_is_refused(subject_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(capsys, _train_argv(subject_dir, out, "--token", "<cat-toy>", "--init-word", "toy story"),
           "toy story", "5 tokens")
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.pt"))


def test_token_already_in_vocabulary_is_refused(subject_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(capsys, _train_argv(subject_dir, out, "--token", "dog", "--init-word", "toy"), "'dog'", "vocabulary")
    assert not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("family,tensors,fragments", [
    ("sd1", {"emb_params": torch.zeros(1, 768)}, ("768", "32", "SD 1.x")),
    ("sd1", {"emb_params": torch.zeros(2, 1024)}, ("1024", "32", "SD 2.x")),
    ("sd1", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, ("clip_l/clip_g", "SDXL", "32")),
    ("sdxl", {"emb_params": torch.zeros(1, 768)}, ("768", "clip_l and clip_g", "32")),
])
def test_embedding_for_another_model_is_refused(tiny_pipeline_dirs, tmp_path, capsys, family, tensors, fragments):
    save_file(tensors, tmp_path / "wide.safetensors")
    out = tmp_path / "img.png"
    _fails(capsys, ["generate", "--model", str(tiny_pipeline_dirs[family]), "--prompt", "a photo of wide",
                    "--artifacts", str(tmp_path), "--steps", "1", "--output", str(out)], "'wide'", *fragments)
    assert not out.exists()


class Payload:
    """Stands for arbitrary code in a pickle."""


def test_pickle_with_arbitrary_objects_is_refused(tiny_pipeline_dirs, tmp_path, capsys):
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "evil", "x": Payload()}, tmp_path / "evil.pt")
    _fails(capsys, ["convert", str(tmp_path / "evil.pt"), str(tmp_path / "out.safetensors"), "--to", "sdtune"],
           "evil.pt")
    assert not (tmp_path / "out.safetensors").exists()
    _fails(capsys, ["generate", "--model", str(tiny_pipeline_dirs["sd1"]), "--prompt", "a photo of evil",
                    "--artifacts", str(tmp_path), "--steps", "1", "--output", str(tmp_path / "img.png")], "evil.pt")
    assert not (tmp_path / "img.png").exists()
