""""Which method when": a headline and at most MAX_BULLETS sentences derived from a comparison's numbers
(results.json), never written ahead.

A difference is called one only when the two 95% intervals do not overlap; rows whose intervals overlap
the best one's are reported as tied with it.
"""

from __future__ import annotations

from ..bench_sizes import human_bytes

SUBJECT_KEYS = ("subject_fidelity", "dino", "clip_i")
PROMPT_KEYS = ("prompt_fidelity", "clip_t")
PRIOR_KEY = "prior_preservation"
REACHED = 0.9  # share of the final subject fidelity that counts as "reached"
# A row is recommended for a small file or a short training only if it is tied with the best subject score or
# reaches this share of it: a tiny file that did not learn the subject is no answer.
SMALL_FILE_SHARE = 0.5
MAX_BULLETS = 6


def estimate_of(row: dict | None, key: str) -> dict | None:
    """A row's (or a ceiling's) final estimate of one quality metric; None where it has none."""
    return ((row or {}).get("quality") or {}).get(key)


def above(a: dict | None, b: dict | None) -> bool:
    """a is clearly higher than b: a's interval lies wholly above b's."""
    return bool(a and b and a["low"] is not None and b["high"] is not None and a["low"] > b["high"])


def rank_value(est: dict | None) -> float:
    """An estimate's value for sorting (missing values last)."""
    return float("-inf") if not est or est["value"] is None else est["value"]


def value_text(est: dict | None) -> str:
    return "n/a" if not est or est["value"] is None else f"{est['value']:.2f}"


def interval_text(est: dict | None) -> str:
    """'0.85 [0.80, 0.90]': a value and its 95% interval ('n/a' when missing)."""
    if not est or est["value"] is None:
        return "n/a"
    return f"{est['value']:.2f} [{est['low']:.2f}, {est['high']:.2f}]"


def names_text(rows: list[dict], key: str | None = None) -> str:
    return join_words([f"{r['name']} ({value_text(estimate_of(r, key))})" if key else r["name"] for r in rows])


def join_words(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def verb_are(rows: list) -> str:
    return "is" if len(rows) == 1 else "are"


def _key(results: dict, keys: tuple[str, ...]) -> str | None:
    present = {m["key"] for m in results["metrics"]}
    return next((k for k in keys if k in present and k not in results.get("missing_metrics", {})), None)


def reading(results: dict) -> list[str]:
    """The report's "which method when" bullets (at most MAX_BULLETS: related findings share one)."""
    trained = [r for r in results["rows"] if r.get("quality") and r["method"]]
    subject = _key(results, SUBJECT_KEYS)
    if not trained:
        return ["No method finished a run, so there is nothing to compare; see the errors in the table."]
    if subject is None:
        missing = "; ".join(sorted(set(results.get("missing_metrics", {}).values())))
        return [f"Quality was not measured ({missing}), so only costs compare: " + _costs(trained)]
    ranked, learners, base = _ranked(results, subject)
    out = [_subject_sentence(ranked, learners, base, subject)]
    if learners:
        out.append(f"Of the rows clearly above the base model, {_costs(learners)}")
    side = _prior_sentences(trained, base) + _prompt_sentences(results, trained, base)
    budget = _budget_sentences(learners, subject)
    out += [" ".join(group) for group in (side, budget) if group]
    out.append(" ".join(_recommendations(ranked, learners, subject)))
    return out


def _ranked(results: dict, subject: str) -> tuple[list[dict], list[dict], dict | None]:
    """(trained rows best first on `subject`, those clearly above the base model, the base row)."""
    rows = [r for r in results["rows"] if r.get("quality")]
    base = next((r for r in rows if r["method"] is None), None)
    trained = [r for r in rows if r["method"]]
    ranked = sorted(trained, key=lambda r: -rank_value(estimate_of(r, subject)))
    learners = [r for r in trained if above(estimate_of(r, subject), estimate_of(base, subject))] if base else trained
    return ranked, learners, base


def headline(results: dict) -> str:
    """One sentence: the row best on subject fidelity, what it cost, and which rows are tied with it."""
    subject = _key(results, SUBJECT_KEYS)
    if subject is None or not any(r.get("quality") and r["method"] for r in results["rows"]):
        return "No subject quality was measured, so no method can be called best; the costs are below."
    ranked, learners, _ = _ranked(results, subject)
    if not learners:
        return "No method learned the subject clearly better than the base model with these settings."
    best = max(learners, key=lambda r: rank_value(estimate_of(r, subject)))
    tied = [r for r in ranked if r is not best and r in learners
            and not above(estimate_of(best, subject), estimate_of(r, subject))]
    est, cost = estimate_of(best, subject), best.get("cost") or {}
    spent = [f"{fmt(cost[key]['mean'])}{what}" for key, what, fmt in (
        ("wall_time_s", " of training", lambda v: f"{v:.0f} s"),
        ("peak_memory_bytes", " of peak memory", human_bytes),
        ("artifact_bytes", " file", lambda v: "a " + human_bytes(v))) if cost.get(key)]
    text = (f"**{best['name']}** learns the subject best ({_label_of(results, subject)} {interval_text(est)})"
            + (f" for {join_words(spent)}" if spent else ""))
    if tied:
        text += f"; {names_text(tied)} {verb_are(tied)} tied with it (95% intervals overlap)"
    return text + "."


def _label_of(results: dict, key: str) -> str:
    return next((m["label"] for m in results["metrics"] if m["key"] == key), key).lower()


def _prompt_sentences(results: dict, trained: list[dict], base: dict | None) -> list[str]:
    prompt = _key(results, PROMPT_KEYS)
    worse = [r for r in trained if above(estimate_of(base, prompt), estimate_of(r, prompt))] if prompt and base else []
    if not worse:
        return []
    return [f"{names_text(worse, prompt)} follow the prompts' other words less well than the base model "
            f"({value_text(estimate_of(base, prompt))})."]


def _subject_sentence(ranked: list[dict], learners: list[dict], base: dict | None, key: str) -> str:
    best = estimate_of(ranked[0], key)
    tied = [r for r in ranked if r is ranked[0] or not above(best, estimate_of(r, key))]
    text = (f"{names_text(tied, key)} learn the subject best"
            + (" (their 95% intervals overlap)." if len(tied) > 1 else "."))
    rest = [r for r in ranked if r not in tied]
    if rest:
        text += f" Then come {names_text(rest, key)}."
    if base:
        flat = [r for r in ranked if r not in learners]
        text += f" The base model scores {value_text(estimate_of(base, key))}"
        text += (f"; {names_text(flat)} {verb_are(flat)} not clearly above it." if flat
                 else "; every method is clearly above it.")
    return text


def _costs(rows: list[dict]) -> str:
    def cost(row: dict, key: str) -> float | None:
        spread = (row.get("cost") or {}).get(key)
        return spread["mean"] if spread else None

    parts = []
    for key, what, fmt in (("wall_time_s", "trains fastest", lambda v: f"{v:.0f} s"),
                           ("peak_memory_bytes", "needs the least peak memory", lambda v: human_bytes(v)),
                           ("artifact_bytes", "writes the smallest file", lambda v: human_bytes(v))):
        have = [r for r in rows if cost(r, key) is not None]
        if have:
            low, high = min(have, key=lambda r: cost(r, key)), max(have, key=lambda r: cost(r, key))
            ratio = cost(high, key) / max(cost(low, key), 1e-9)
            times = f"{ratio:.1f}x" if ratio < 10 else f"{ratio:,.0f}x"
            parts.append(f"{low['name']} {what} ({fmt(cost(low, key))}"
                         + (f"; {high['name']}: {fmt(cost(high, key))}, {times})" if ratio > 1.05 else ")"))
    return "; ".join(parts) + "."


def _prior_on(row: dict) -> bool:
    return bool(row["settings"].get("train", {}).get("prior_preservation"))


def _prior_sentences(trained: list[dict], base: dict | None) -> list[str]:
    out = []
    for on in [r for r in trained if _prior_on(r)]:
        for off in [r for r in trained if r["method"] == on["method"] and not _prior_on(r)]:
            a, b = estimate_of(on, PRIOR_KEY), estimate_of(off, PRIOR_KEY)
            if a and b and a["value"] is not None and b["value"] is not None:
                verdict = ("clearly better" if above(a, b) else "clearly worse" if above(b, a)
                           else "not clearly different (intervals overlap)")
                out.append(f"Prior preservation on {on['method']}: the class word keeps its meaning "
                           f"{interval_text(a)} with it ({on['name']}) and {interval_text(b)} without "
                           f"({off['name']}): {verdict}.")
    if base:
        leaking = [r for r in trained if above(estimate_of(base, PRIOR_KEY), estimate_of(r, PRIOR_KEY))]
        if leaking:
            # The metric cannot tell the subject leaking in from plain objects in the wrong colour: say only
            # that the class word draws less of what it asks for.
            out.append(f"{names_text(leaking, PRIOR_KEY)} keep the class word's meaning less well than the base model "
                       f"({value_text(estimate_of(base, PRIOR_KEY))} on prior preservation).")
    return out


def _budget_sentences(learners: list[dict], key: str) -> list[str]:
    """One sentence: the step (and seconds) each learner reached REACHED of its final subject score."""
    reached, improving = [], []
    for row in learners:
        curve = [p for p in row.get("curve", []) if (p["quality"].get(key) or {}).get("value") is not None]
        if len(curve) < 2:
            continue
        final = curve[-1]["quality"][key]
        first = next(p for p in curve if p["quality"][key]["value"] >= REACHED * final["value"])
        reached.append(f"{row['name']} by step {first['step']} ({first['seconds']:.0f} s of "
                       f"{curve[-1]['seconds']:.0f} s)")
        if above(final, curve[-2]["quality"][key]):
            improving.append(row)
    if not reached:
        return []
    text = f"{REACHED:.0%} of the final subject score is reached: " + "; ".join(reached) + "."
    if improving:
        text += (f" {names_text(improving)} {verb_are(improving)} still improving at the end: more steps would "
                 "likely help.")
    return [text]


def _recommendations(ranked: list[dict], learners: list[dict], key: str) -> list[str]:
    if not learners:
        return ["No method learned the subject clearly with these settings: raise the steps or learning rates "
                "(--config) and compare again."]
    best = max(learners, key=lambda r: estimate_of(r, key)["value"])
    tied = [r for r in ranked if r in learners and not above(estimate_of(best, key), estimate_of(r, key))]
    text = f"**When the subject must look right**: {names_text(tied)}" + (" (tied)" if len(tied) > 1 else "")
    kept = [r for r in tied if estimate_of(r, PRIOR_KEY) and estimate_of(r, PRIOR_KEY)["value"] is not None]
    if len(tied) > 1 and kept:
        keeper = max(kept, key=lambda r: estimate_of(r, PRIOR_KEY)["value"])
        text += f"; of these {keeper['name']} keeps the class word best ({value_text(estimate_of(keeper, PRIOR_KEY))})"
    out = [text + "."]
    kept = [r for r in learners if estimate_of(r, PRIOR_KEY) and estimate_of(r, PRIOR_KEY)["value"] is not None]
    if kept:
        keeper = max(kept, key=lambda r: estimate_of(r, PRIOR_KEY)["value"])
        out.append(f"**When the class word must keep its meaning**: {keeper['name']} "
                   f"(prior preservation {value_text(estimate_of(keeper, PRIOR_KEY))}).")
    cheap = [text for cost, need, fmt in (("artifact_bytes", "the file must be small", human_bytes),
                                          ("wall_time_s", "training time is short", lambda v: f"{v:.0f} s"))
             for text in _cheapest(learners, best, key, cost, need, fmt)]
    if cheap:
        cheap.append(f"(Those two picks consider only rows tied with the best subject score or reaching "
                     f"{SMALL_FILE_SHARE:.0%} of it.)")
    return out + cheap


def _cheapest(learners: list[dict], best: dict, key: str, cost: str, need: str, fmt) -> list[str]:
    """The row lowest on `cost` among those tied with the best subject score or reaching SMALL_FILE_SHARE of
    it (a cheap row that did not learn the subject is no answer); names a cheaper row left out and why."""
    def spent(row: dict) -> float:
        return row["cost"][cost]["mean"]

    def share(row: dict) -> float:
        return estimate_of(row, key)["value"] / max(estimate_of(best, key)["value"], 1e-9)

    have = [r for r in learners if (r.get("cost") or {}).get(cost)]
    fit = [r for r in have if share(r) >= SMALL_FILE_SHARE or not above(estimate_of(best, key), estimate_of(r, key))]
    if not fit:
        return []
    pick, cheapest = min(fit, key=spent), min(have, key=spent)
    text = f"**When {need}**: {pick['name']} ({fmt(spent(pick))}, {share(pick):.0%} of the best subject score)"
    if cheapest is not pick:
        text += f"; {cheapest['name']} costs less ({fmt(spent(cheapest))}) but reaches only {share(cheapest):.0%}"
    return [text + "."]
