"""The benchmark's own bars, computed from a comparison's numbers and shown in the report (never asserted at
run time): each subject is learnable and discriminating, and a method lies above the base model on the kind
of subject it is made for."""

from __future__ import annotations

from .kinds import HEADLINE, base_row
from .reading import above, estimate_of, interval_text, rank_value
from .usage import subject_parts

HALF_WAY = 0.5  # the best row must cover this share of the way from the floor to the ceiling
# (kind of subject, method, why): every row of the method must lie above the base model on that kind.
MADE_FOR = (("nameable look", "textual-inversion",
             "a look the base model already draws from words is the case one learned embedding is made for"),)
LEARNABLE = "best row half-way from floor to ceiling, above the base model"


def benchmark_checks(results: dict) -> list[dict]:
    """Per subject with a base row: the learnable check (where it has a ceiling) and the made-for checks of
    its kind, each with its numbers, `passed` (None: not checkable) and one sentence."""
    checks = []
    for part in subject_parts(results):
        base = base_row(part)
        if base is None:
            continue
        if part.get("ceiling"):
            checks.append(_learnable(part, base))
        for kind, method, why in MADE_FOR:
            if part.get("kind") == kind:
                checks += [_made_for(part, base, row, why) for row in part["rows"] if row["method"] == method]
    return checks


def _entry(part: dict, check: str, row: dict | None, floor: dict | None, **numbers) -> dict:
    return {"subject": part["name"], "kind": part.get("kind"), "check": check, "row": row and row["name"],
            "estimate": estimate_of(row, HEADLINE) if row else None, "floor": floor,
            "ceiling": None, "half_way": None, **numbers}


def _verdict(entry: dict, reasons: list[str], checkable: bool = True) -> dict:
    """The entry with `passed` (False where any reason; None where not checkable), its reasons and one sentence."""
    passed = not reasons if checkable else None
    word = "not checked" if passed is None else "pass" if passed else "fail"
    est = entry["estimate"]
    numbers = [f"{entry['row']} {interval_text(est)}" if est else entry["row"] or "no row",
               f"floor (base model) {interval_text(entry['floor'])}"]
    if entry["ceiling"]:
        numbers.append(f"ceiling {interval_text(entry['ceiling'])}, half-way mark {entry['half_way']:.2f}")
    text = f"{entry['subject']}, {entry['check']}: {word}" + (f" ({'; '.join(reasons)})" if reasons else "")
    return {**entry, "passed": passed, "reasons": reasons, "text": f"{text}: {', '.join(numbers)}."}


def _learnable(part: dict, base: dict) -> dict:
    floor, ceiling = estimate_of(base, HEADLINE), estimate_of(part["ceiling"], HEADLINE)
    trained = [r for r in part["rows"] if r["method"] and r.get("quality")]
    best = max(trained, key=lambda r: rank_value(estimate_of(r, HEADLINE))) if trained else None
    entry = _entry(part, LEARNABLE, best, floor, ceiling=ceiling)
    if any(e is None or e["value"] is None for e in (floor, ceiling)):
        return _verdict(entry, ["the floor or the ceiling was not measured"], checkable=False)
    entry["half_way"] = round(floor["value"] + HALF_WAY * (ceiling["value"] - floor["value"]), 4)
    est = entry["estimate"]
    if not est or est["value"] is None:
        return _verdict(entry, ["no row finished with a subject score"])
    return _verdict(entry, ([] if est["value"] >= entry["half_way"] else ["below the half-way mark"])
                    + ([] if above(est, floor) else ["interval not above the base model's"]))


def _made_for(part: dict, base: dict, row: dict, why: str) -> dict:
    entry = _entry(part, f"{row['method']} above the base model ({why})", row, estimate_of(base, HEADLINE))
    if not row.get("quality"):
        return _verdict(entry, ["the row did not finish"])
    return _verdict(entry, [] if above(entry["estimate"], entry["floor"]) else ["interval not above the base model's"])
