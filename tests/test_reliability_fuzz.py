"""A short run of the fuzzer (`python -m sdtune.fuzz` runs >= 10,000 cases; see BENCHMARKS.md): every
reader of untrusted input, fed random, mutated and structured inputs, only ever raises SdtuneError."""

from __future__ import annotations

from sdtune import fuzz


def test_readers_of_untrusted_input_only_raise_sdtune_errors():
    outcomes = fuzz.run(cases=30 * len(fuzz.targets()), seed=1)
    assert {o.target for o in outcomes} == {t.name for t in fuzz.targets()}
    crashes = [f"{o.target}: {o.crash}" for o in outcomes if o.crash]
    assert not crashes, crashes
    assert all(o.cases >= 30 for o in outcomes)
    # the inputs reach past the first checks: some artifacts decode, apply and run; others are refused
    read = {o.target: o.read for o in outcomes}
    assert read["prompt parser"] and read["LoRA decoder"] + read["embedding decoder"] + read["hypernetwork decoder"]
    assert all(o.refused > 0 for o in outcomes if o.target != "prompt parser")


def test_a_crash_is_reported_with_its_input():
    def check(value, ctx):
        if value > 5:
            raise KeyError("boom")

    from hypothesis import strategies as st

    target = fuzz.Target("demo", lambda ctx: st.integers(0, 10), check)
    outcome = fuzz.fuzz_target(target, 50, 0, fuzz.Context(folder=None))
    assert outcome.crash.startswith("KeyError: 'boom'") and "input: 6" in outcome.crash
    assert "| demo | " in fuzz.report([outcome]) and "**1**" in fuzz.report([outcome])
