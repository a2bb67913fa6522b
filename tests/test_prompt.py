"""A1111 prompt syntax: artifact tags, artifact lookup, attention emphasis."""

from __future__ import annotations

import pytest

from sdtune.errors import SdtuneError
from sdtune.prompt import ArtifactTag, parse_artifact_tags, parse_emphasis, resolve_artifact


def _tags(prompt: str) -> list[tuple[str, str, float]]:
    return [(t.kind, t.name, t.weight) for t in parse_artifact_tags(prompt)[1]]


# ------------------------------------------------------------------ artifact tags


@pytest.mark.parametrize(
    "prompt",
    [
        "a photo of sks dog",
        "a  photo,, of dog ,  with  (emphasis:1.2) and <angle brackets> and <other:x:1>",
        "  leading and trailing  ",
        "",
        "line one\nline two, BREAK three",
    ],
)
def test_prompt_without_tags_is_unchanged(prompt: str) -> None:
    assert parse_artifact_tags(prompt) == (prompt, [])


def test_tag_weights_default_negative_and_decimal() -> None:
    text, tags = parse_artifact_tags("a dog <lora:a:0.8> <lora:b> <hypernet:c:-1> <lora:d:.5> <lora:e:+2.>")
    assert text == "a dog"
    assert [(t.kind, t.name, t.weight) for t in tags] == [
        ("lora", "a", 0.8),
        ("lora", "b", 1.0),
        ("hypernet", "c", -1.0),
        ("lora", "d", 0.5),
        ("lora", "e", 2.0),
    ]
    assert tags[0].text == "<lora:a:0.8>"


def test_names_with_spaces_dashes_dots_and_lyco_alias() -> None:
    assert _tags("<lora:my style-v1.5:0.7>, cat") == [("lora", "my style-v1.5", 0.7)]
    assert _tags("cat <lyco:loha thing:0.3>") == [("lora", "loha thing", 0.3)]
    assert _tags("cat <LoRA:x:1>") == [("lora", "x", 1.0)]
    assert _tags("cat <lora: spaced name : 0.5 >") == [("lora", "spaced name", 0.5)]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a photo of sks dog <lora:x:1>", "a photo of sks dog"),
        ("<lora:x:1> a photo", "a photo"),
        ("<lora:x:1>, a photo, <hypernet:h:0.5>", "a photo"),
        ("a photo, <lora:x:1>, of dog", "a photo, of dog"),
        ("a photo <lora:x:1>, of dog", "a photo, of dog"),
        ("a photo <lora:x:1> of dog", "a photo of dog"),
        ("a photo, <lora:x:1>, <lora:y:1>, of dog", "a photo, of dog"),
        ("a photo<lora:x:1>, of dog", "a photo, of dog"),
        ("masterpiece, (sks dog:1.2) <lora:x>", "masterpiece, (sks dog:1.2)"),
        ("<lora:x:1>", ""),
        ("<lora:x:1> <lora:y:2>", ""),
    ],
)
def test_tags_are_stripped_cleanly(prompt: str, expected: str) -> None:
    assert parse_artifact_tags(prompt)[0] == expected


def test_other_angle_tags_are_left_alone() -> None:
    text, tags = parse_artifact_tags("a <embedding:x> dog <lora:y:1>")
    assert text == "a <embedding:x> dog"
    assert [t.name for t in tags] == ["y"]


@pytest.mark.parametrize(
    ("prompt", "bad"),
    [
        ("a <lora:> dog", "<lora:>"),
        ("a <lora::0.5> dog", "<lora::0.5>"),
        ("a <lora:x:abc> dog", "<lora:x:abc>"),
        ("a <hypernet:x:1..2> dog", "<hypernet:x:1..2>"),
        ("a <lora:x:> dog", "<lora:x:>"),
        ("a <lora:x:0.5:0.2> dog", "<lora:x:0.5:0.2>"),
        ("a <lora:x:nan> dog", "<lora:x:nan>"),
    ],
)
def test_malformed_tags_are_refused_by_name(prompt: str, bad: str) -> None:
    with pytest.raises(SdtuneError) as err:
        parse_artifact_tags(prompt)
    assert bad in str(err.value)


# ------------------------------------------------------------------ artifact lookup


def test_resolve_prefers_first_dir_then_safetensors(tmp_path) -> None:
    d1, d2 = tmp_path / "one", tmp_path / "two"
    (d1 / "sub").mkdir(parents=True)
    d2.mkdir()
    (d1 / "style.pt").write_bytes(b"x")
    (d1 / "style.safetensors").write_bytes(b"x")
    (d2 / "style.safetensors").write_bytes(b"x")
    (d2 / "only2.ckpt").write_bytes(b"x")
    (d1 / "sub" / "nested.v1.bin").write_bytes(b"x")
    (d1 / "style.txt").write_bytes(b"x")
    assert resolve_artifact(ArtifactTag("lora", "style"), [d1, d2]) == d1 / "style.safetensors"
    assert resolve_artifact(ArtifactTag("lora", "style"), [d2, d1]) == d2 / "style.safetensors"
    assert resolve_artifact(ArtifactTag("lora", "only2"), [d1, d2]) == d2 / "only2.ckpt"
    assert resolve_artifact(ArtifactTag("lora", "nested.v1"), [d1]) == d1 / "sub" / "nested.v1.bin"
    assert resolve_artifact(ArtifactTag("hypernet", "style"), [d1], suffixes=(".pt",)) == d1 / "style.pt"


def test_resolve_missing_lists_folders_and_suggests(tmp_path) -> None:
    d1, d2 = tmp_path / "loras", tmp_path / "absent"
    d1.mkdir()
    (d1 / "sks_dog_v2.safetensors").write_bytes(b"x")
    (d1 / "unrelated.safetensors").write_bytes(b"x")
    with pytest.raises(SdtuneError) as err:
        resolve_artifact(ArtifactTag("lora", "sks_dog_v1", 1.0, "<lora:sks_dog_v1>"), [d1, d2])
    msg = str(err.value)
    assert str(d1) in msg and str(d2) in msg
    assert "sks_dog_v2" in msg and "unrelated" not in msg
    assert "<lora:sks_dog_v1>" in msg


def test_resolve_missing_without_close_names(tmp_path) -> None:
    with pytest.raises(SdtuneError) as err:
        resolve_artifact(ArtifactTag("hypernet", "zzz"), [tmp_path])
    assert "did you mean" not in str(err.value) and str(tmp_path) in str(err.value)


# ------------------------------------------------------------------ emphasis


def _approx(parsed: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])


def test_emphasis_documented_a1111_examples() -> None:
    _approx(parse_emphasis("normal text"), [("normal text", 1.0)])
    _approx(parse_emphasis("an (important) word"), [("an ", 1.0), ("important", 1.1), (" word", 1.0)])
    _approx(parse_emphasis("(unbalanced"), [("unbalanced", 1.1)])
    _approx(parse_emphasis(r"\(literal\]"), [("(literal]", 1.0)])
    _approx(parse_emphasis("(unnecessary)(parens)"), [("unnecessaryparens", 1.1)])
    _approx(
        parse_emphasis("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
        [
            ("a ", 1.0),
            ("house", 1.1 * 1.1 * 1.3),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.1**4),
            (".", 1.1),
        ],
    )


def test_emphasis_balanced_variant_hand_worked() -> None:
    # In A1111's example "(((house:1.3))" leaves one "(" open, which lifts everything after it by 1.1;
    # with that bracket removed the text outside the brackets stays at 1.0.
    _approx(
        parse_emphasis("a ((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
        [
            ("a ", 1.0),
            ("house", 1.43),
            (" ", 1.0),
            ("on", 1 / 1.1),
            (" a ", 1.0),
            ("hill", 0.5),
            (", sun, ", 1.0),
            ("sky", 1.331),
            (".", 1.0),
        ],
    )


def test_emphasis_square_nesting_escapes_and_unmatched_closers() -> None:
    _approx(parse_emphasis("[[faint]] x"), [("faint", 1 / 1.21), (" x", 1.0)])
    _approx(parse_emphasis("([mixed])"), [("mixed", 1.0)])
    _approx(parse_emphasis("a) b] c"), [("a) b] c", 1.0)])
    _approx(parse_emphasis(r"\\(x\)"), [("\\", 1.0), ("x)", 1.1)])
    _approx(parse_emphasis("(x: 1.5 ) y"), [("x", 1.5), (" y", 1.0)])
    _approx(parse_emphasis("(x:-0.5)"), [("x", -0.5)])
    _approx(parse_emphasis("time: 12:30"), [("time: 12:30", 1.0)])
    _approx(parse_emphasis("x:1.5)"), [("x:1.5)", 1.0)])
    _approx(parse_emphasis("[unclosed square"), [("unclosed square", 1 / 1.1)])


def test_emphasis_break_and_empty() -> None:
    _approx(parse_emphasis("a cat BREAK a dog"), [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)])
    _approx(parse_emphasis("(red BREAK blue)"), [("red", 1.1), ("BREAK", -1.0), ("blue", 1.1)])
    _approx(parse_emphasis("x BREAK BREAK y"), [("x", 1.0), ("BREAK", -1.0), ("BREAK", -1.0), ("y", 1.0)])
    _approx(parse_emphasis("BREAKFAST"), [("BREAKFAST", 1.0)])
    assert parse_emphasis("") == [("", 1.0)]
    assert parse_emphasis("()") == [("", 1.0)]


def test_emphasis_bad_weight_is_literal() -> None:
    _approx(parse_emphasis("(x:1.2.3)"), [("x:1.2.3)", 1.1)])
