"""The builtin benchmark subjects, one entry each: a fifth is one more entry in SUBJECTS (and a scorer only
if looks.read_look cannot read its look). Every background a subject's images or prompts use keeps clear of
the look's own colours, so the object always stands out."""

from __future__ import annotations

from sdtune.errors import SdtuneError
from sdtune.toyworld.captions import caption
from sdtune.toyworld.looks import Look
from sdtune.toyworld.subjects import Context, Subject

QUARTERED_CIRCLE = Subject(
    name="quartered-circle", kind="new look",
    description="a circle quartered in yellow and purple, a look no caption can ask for",
    token="sks", class_word="circle",
    look=Look("yellow", "quadrants", "purple", shape="circle"),
    instances=tuple(Context("circle", b, p) for b, p in (
        ("blue", "center"), ("green", "top left"), ("white", "bottom right"), ("green", "center"),
        ("blue", "bottom right"))),
    held_out_backgrounds=("red", "orange", "black"), held_out_positions=("top right", "bottom left"),
    # Plain circles, including the subject's own two colours.
    class_prompts=tuple(caption("circle", colour=c, background=b) for c, b in (
        ("yellow", "blue"), ("purple", "white"), ("red", "green"), ("white", "black"), ("blue", "orange"),
        ("green", "red"))),
)

DOTTED_SQUARE = Subject(
    name="dotted-square", kind="new look",
    description="a white square with a red disc in its middle: a second new look, on another class",
    token="sks", class_word="square",
    look=Look("white", "ring", "red", shape="square"),
    instances=tuple(Context("square", b, p) for b, p in (
        ("blue", "center"), ("black", "top right"), ("yellow", "bottom left"), ("black", "center"),
        ("blue", "top right"))),
    held_out_backgrounds=("green", "purple", "orange"), held_out_positions=("top left", "bottom right"),
    class_prompts=tuple(caption("square", colour=c, background=b) for c, b in (
        ("white", "blue"), ("red", "black"), ("yellow", "green"), ("blue", "white"), ("black", "orange"),
        ("orange", "purple"))),
)

GREEN_TRIANGLE = Subject(
    name="green-triangle", kind="nameable look",
    description="a small green triangle: a look the base model already draws from words, bound to the identifier",
    token="sks", class_word="triangle",
    look=Look("green", shape="triangle", size="small"),
    instances=tuple(Context("triangle", b, p) for b, p in (
        ("white", "center"), ("blue", "top left"), ("red", "bottom right"), ("blue", "center"),
        ("white", "bottom right"))),
    held_out_backgrounds=("yellow", "purple", "black"), held_out_positions=("top right", "bottom left"),
    new_size=None,  # the size is the look's own
    # Triangles of other colours, and green ones only at the other size: a class word turned into the
    # subject fails them on colour or size.
    class_prompts=(caption("triangle", colour="green", size="large", background="white"),
                   caption("triangle", colour="red", background="blue"),
                   caption("triangle", colour="yellow", background="black"),
                   caption("triangle", colour="blue", size="small", background="white"),
                   caption("triangle", colour="white", background="red"),
                   caption("triangle", colour="purple", background="yellow")),
)

ZEBRA = Subject(
    name="zebra", kind="style",
    description="white and black stripes on whatever shape is asked for, learnt from circles, squares and "
                "hearts, evaluated on triangles, stars and crosses too",
    token="sks", class_word="circle",
    look=Look("white", "stripes", "black"),
    instances=(Context("circle", "red", "center"), Context("square", "green", "top left"),
               Context("heart", "blue", "bottom right"), Context("circle", "blue", "top left"),
               Context("square", "red", "bottom right"), Context("heart", "green", "center")),
    held_out_backgrounds=("yellow", "purple", "orange"), held_out_positions=("top right", "bottom left"),
    held_out_shapes=("triangle", "star", "cross"),
    # Plain shapes in the style's own colours: the style leaking into the class words fails them.
    class_prompts=tuple(caption(s, colour=c, background=b) for s, c, b in (
        ("circle", "white", "red"), ("square", "black", "green"), ("heart", "white", "blue"),
        ("star", "black", "yellow"), ("triangle", "white", "purple"), ("cross", "black", "orange"))),
)

SUBJECTS: dict[str, Subject] = {s.name: s for s in (QUARTERED_CIRCLE, DOTTED_SQUARE, GREEN_TRIANGLE, ZEBRA)}
DEFAULT_SUBJECT = QUARTERED_CIRCLE.name


def get_subject(name: str) -> Subject:
    """The builtin subject called `name`; an unknown name is refused with the known ones."""
    if name not in SUBJECTS:
        raise SdtuneError(f"There is no builtin subject '{name}'; choose one of {', '.join(SUBJECTS)}.")
    return SUBJECTS[name]


def select_subjects(names: str) -> list[Subject]:
    """Subjects named by a comma list, or 'all'."""
    if names.strip() == "all":
        return list(SUBJECTS.values())
    picked = [get_subject(n.strip()) for n in names.split(",") if n.strip()]
    if not picked:
        raise SdtuneError(f"No subject named; choose all or some of {', '.join(SUBJECTS)}.")
    return list(dict.fromkeys(picked))
