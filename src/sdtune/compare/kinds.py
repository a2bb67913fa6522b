"""Readings per kind of subject ("for a look the model can already draw …; for a new look …; for a style …"),
derived from each subject's 95% intervals like the pooled reading, never written ahead.

A kind with several subjects (two new looks) is read on each subject and a verdict is stated only where every
subject of the kind agrees, naming the subjects where they differ: the second subject is there to show that a
verdict is not about one shape, and pooling them would let a clear win on one hide a failure on the other.
"""

from __future__ import annotations

from .reading import above, estimate_of, interval_text, join_words, rank_value, verb_are
from .usage import subject_parts

HEADLINE = "subject_fidelity"  # the one-new-factor prompts' subject fidelity, as in DreamBench
PROMPT, PRIOR = "prompt_fidelity", "prior_preservation"
UNSEEN = "held_out_class"  # a style's prompt type: classes its images never show
# How a kind is named in its sentence; a kind not listed here reads "for a <kind>".
KIND_PHRASES = {"nameable look": "a look the model can already draw from words",
                "new look": "a new look, one no caption can ask for",
                "style": "a style"}
# (quality key, what a row clearly below the base model on it does) for the sentence that qualifies the best rows.
SIDE_EFFECTS = ((PROMPT, "follows the prompts' other words less well"),
                (PRIOR, "keeps the class word's meaning less well"))
RULE = ("Each kind of subject is read on its own subjects' intervals (one-new-factor subject fidelity, as the "
        "headline): a row is best where its 95% interval overlaps the best row's, above the base model where its "
        "interval lies wholly above the base model's. A kind with several subjects is read on each of them, and a "
        "verdict is stated only where all agree (where they differ, the subjects are named): pooling them would "
        "let a clear win on one shape hide a failure on the other.")


def kind_readings(results: dict) -> list[dict]:
    """One reading per kind of subject in the run, in the order the kinds first appear: the rows best on the
    headline, those above the base model on every / some / none of the kind's subjects, and one sentence."""
    groups: dict[str, list[dict]] = {}
    for part in subject_parts(results):
        if part.get("kind") and base_row(part) is not None:
            groups.setdefault(part["kind"], []).append(part)
    return [_kind_reading(kind, parts) for kind, parts in groups.items()]


def base_row(part: dict) -> dict | None:
    """One subject's base-model row (its floor), None where it has no quality."""
    return next((r for r in part["rows"] if r["method"] is None and r.get("quality")), None)


def _row(part: dict, name: str) -> dict:
    return next(r for r in part["rows"] if r["name"] == name)


def _est(part: dict, name: str, key: str = HEADLINE, prompt_type: str | None = None) -> dict | None:
    """A row's estimate on one subject: a headline metric, or subject fidelity on one prompt type."""
    row = _row(part, name)
    if prompt_type is None:
        return estimate_of(row, key)
    return ((row.get("quality_by_type") or {}).get(prompt_type) or {}).get(HEADLINE)


def _above_base(part: dict, name: str, key: str = HEADLINE, prompt_type: str | None = None) -> bool:
    base = base_row(part)["name"]
    return above(_est(part, name, key, prompt_type), _est(part, base, key, prompt_type))


def _below_base(part: dict, name: str, key: str) -> bool:
    return above(_est(part, base_row(part)["name"], key), _est(part, name, key))


def _tied_best(part: dict, names: list[str]) -> list[str]:
    """The rows whose interval overlaps the best row's on this subject."""
    best = max(names, key=lambda n: rank_value(_est(part, n)))
    return [n for n in names if not above(_est(part, best), _est(part, n))]


def _kind_reading(kind: str, parts: list[dict]) -> dict:
    failed = {r["name"]: [p["name"] for p in parts if not _row(p, r["name"]).get("quality")]
              for r in parts[0]["rows"] if r["method"]}
    names = [n for n, where in failed.items() if not where]
    reading = {"kind": kind, "subjects": [p["name"] for p in parts], "best": [], "above_base": [],
               "above_base_on_some": {}, "not_above_base": [], "side_effects": {}, "unseen_classes": None}
    if names:
        ranked = sorted(names, key=lambda n: -sum(rank_value(_est(p, n)) for p in parts))
        above_on = {n: [p["name"] for p in parts if _above_base(p, n)] for n in ranked}
        reading.update(
            best=[n for n in ranked if all(n in _tied_best(p, names) for p in parts)],
            above_base=[n for n in ranked if len(above_on[n]) == len(parts)],
            above_base_on_some={n: on for n, on in above_on.items() if 0 < len(on) < len(parts)},
            not_above_base=[n for n in ranked if not above_on[n]],
            side_effects={n: {key: [p["name"] for p in parts if _below_base(p, n, key)] for key, _ in SIDE_EFFECTS}
                          for n in ranked})
        unseen = [p for p in parts if UNSEEN in (base_row(p).get("quality_by_type") or {})]
        if unseen:
            reading["unseen_classes"] = [n for n in ranked
                                         if all(_above_base(p, n, prompt_type=UNSEEN) for p in unseen)]
    reading["text"] = _sentence(reading, parts, {n: where for n, where in failed.items() if where})
    return reading


def _values(parts: list[dict], name: str, key: str = HEADLINE) -> str:
    """A row's value [interval] on each subject: '0.80 [0.76, 0.84] on a, 0.70 [0.65, 0.75] on b'."""
    if len(parts) == 1:
        return interval_text(_est(parts[0], name, key))
    return ", ".join(f"{interval_text(_est(p, name, key))} on {p['name']}" for p in parts)


def _each(count: int) -> str:
    return "" if count == 1 else " on both" if count == 2 else " on every one"


def _sentence(reading: dict, parts: list[dict], failed: dict[str, list[str]]) -> str:
    subjects = [p["name"] for p in parts]
    opening = f"**For {KIND_PHRASES.get(reading['kind'], 'a ' + reading['kind'])}** ({join_words(subjects)}"
    opening += ", each read on its own)" if len(parts) > 1 else ")"
    text = [opening + ":"]
    if failed:
        text.append(f"{join_words([f'{n} failed on {join_words(w)}' for n, w in failed.items()])}, so "
                    f"{'it is' if len(failed) == 1 else 'they are'} not read here.")
    if not reading["side_effects"]:
        return " ".join(text + ["no method finished on every subject of this kind."])
    if reading["above_base"] or reading["above_base_on_some"]:
        text += [_best_sentence(reading, parts), _base_sentence(reading, parts)]
        text += _side_effect_sentences(reading, parts)
    else:  # nothing learned: "best" would only rank noise around the floor
        rows = "; ".join(f"{n} {_values(parts, n)}" for n in reading["side_effects"])
        text.append(f"no row lies above the base model (base {_values(parts, base_row(parts[0])['name'])}; {rows}): no "
                    "method learns this kind with this recipe.")
    if reading["unseen_classes"] is not None:
        carry, rest = reading["unseen_classes"], [n for n in reading["side_effects"] if n not in
                                                  reading["unseen_classes"]]
        text.append(f"On classes its images never show, {join_words(carry)} {verb_are(carry)} above the base "
                    "model" + (f"; {join_words(rest)} {'does' if len(rest) == 1 else 'do'} not" if rest else "") + "."
                    if carry else "On classes its images never show, no row is above the base model.")
    return " ".join(text)


def _best_sentence(reading: dict, parts: list[dict]) -> str:
    best = reading["best"]
    if not best:
        per = "; ".join(f"on {p['name']}, {join_words(_tied_best(p, list(reading['side_effects'])))}" for p in parts)
        return f"no row is best on every subject ({per})."
    values = join_words([f"{n} ({_values(parts, n)})" for n in best])
    return (f"{values} {verb_are(best)} best on subject fidelity with one new factor{_each(len(parts))}"
            + (" (their 95% intervals overlap)." if len(best) > 1 else "."))


def _base_sentence(reading: dict, parts: list[dict]) -> str:
    base = base_row(parts[0])["name"]
    lead = f"The base model scores {_values(parts, base)}"
    everywhere, some, none = reading["above_base"], reading["above_base_on_some"], reading["not_above_base"]
    out = [f"{lead}; {join_words(everywhere)} {verb_are(everywhere)} above it{_each(len(parts))}" if everywhere
           else f"{lead}; no row is above it{_each(len(parts))}"]
    out += [f"{n} only on {join_words(on)}" for n, on in some.items()]
    text = "; ".join(out) + "."
    if none:
        fails = join_words([f"{n} ({_values(parts, n)})" for n in none])
        text += f" {fails} {'fails' if len(none) == 1 else 'fail'} here: not above the base model" + \
            ("" if len(parts) == 1 else " on any of them") + "."
    return text


def _side_effect_sentences(reading: dict, parts: list[dict]) -> list[str]:
    """What the best rows pay in prompt fidelity and prior preservation, and which rows above the base model
    pay nothing, when the best ones do."""
    out, paying = [], set()
    for name in reading["best"]:
        for key, what in SIDE_EFFECTS:
            where = reading["side_effects"][name][key]
            if where:
                paying.add(name)
                on = "" if len(parts) == 1 else f" on {join_words(where)}"
                base = base_row(parts[0])["name"]
                worse = [p for p in parts if p["name"] in where]
                out.append(f"{name} {what} than the base model{on} ({_values(worse, name, key)} against "
                           f"{_values(worse, base, key)}).")
    clean = [n for n in reading["above_base"] if not any(reading["side_effects"][n].values())]
    if reading["best"] and not paying:
        out.append(f"{join_words(reading['best'])} {'keeps' if len(reading['best']) == 1 else 'keep'} prompt "
                   "fidelity and prior preservation at the base model's level.")
    elif paying:
        out.append(f"Of the rows above the base model, {join_words(clean)} {'keeps' if len(clean) == 1 else 'keep'} "
                   "both at the base model's level." if clean else
                   "No row above the base model keeps both at the base model's level.")
    return out
