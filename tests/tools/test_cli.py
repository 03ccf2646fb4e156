"""The `vsampler` command line: a real (tiny) benchmark run, its JSON, and argument errors."""

import json
import re

import pytest

from vsampler.tools.cli import EXIT_OK, main


def test_bench_runs_checks_and_writes_json_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the TPU estimates: computed, not from a cache
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    code = main(
        [
            "bench",
            "--configs",
            "greedy,full",
            "--batch",
            "2",
            "--vocab",
            "300",
            "--dtype",
            "float32",
            "--repeats",
            "1",
            "--json",
            str(out),
            "--plot",
            str(png),
            "--estimate",
        ]
    )
    assert code == EXIT_OK
    data = json.loads(out.read_text())
    assert data["environment"]["backend"] == "cpu"
    rows = data["results"]
    assert {(r["config"], r["impl"]) for r in rows} >= {("greedy", "reference"), ("full", "reference")}
    for r in rows:
        assert r["verified"] and r["agree_rows"] == r["rows"] == 2
        assert r["median_ms"] > 0 and r["x_floor"] > 0 and r["speedup_vs_categorical"] > 0
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["spread"] >= 0 and r["calls"] == 1
    features = data["features"]  # timed on the "full" workload only, by each fast path
    assert {(f["impl"], f["feature"]) for f in features} == {
        ("xla", "logprobs raw"),
        ("xla", "logprobs processed"),
        ("xla", "allowed_tokens"),
    }
    for f in features:
        assert f["verified"] and f["workload"].startswith("full")
        assert 0 < f["ratio_min"] <= f["cost_ratio"] <= f["ratio_max"]
    printed = capsys.readouterr().out
    assert "measurements, 0 failed verification (logprobs raw" in printed
    # piped (pytest captures stdout): one line per finished phase, and tables at their own width
    assert re.search(r"^timing: 2/2 done in \d+ s$", printed, re.M)
    assert re.search(r"^serving features: 1/1 done in \d+ s$", printed, re.M)
    assert re.search(r"│ greedy +│ 2 │ 300 │ f32 +│ reference │.*│ yes +│$", printed, re.M), "a table row wrapped"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from vsampler.tools import estimate

    if estimate.libtpu_version() is not None:  # the kernel's static TPU estimate, per config and generation
        estimates = data["tpu_estimates"]
        assert {(e["case"]["generation"], e["case"]["config"]) for e in estimates} == {
            (g, c) for g in ("v5e", "v6e") for c in ("greedy", "full")
        }
        for e in estimates:
            assert e["ok"] and e["estimated_us"] > 0 and e["x_floor"] > 0 and e["label"] == estimate.LABEL
        assert (tmp_path / "vsampler" / "estimates.json").exists()


def test_bench_defaults_to_the_headline_and_full_is_the_whole_grid():
    from vsampler.tools import workloads
    from vsampler.tools.cli import bench_cases, build_parser

    def cases(*argv):
        return [(c.config, c.batch, c.vocab, c.dtype) for c in bench_cases(build_parser().parse_args(["bench", *argv]))]

    assert cases() == [(c, 64, 128256, "float32") for c in workloads.CONFIGS]
    assert len(cases("--full")) == len(workloads.CONFIGS) * 3 * 2 * 2 == len(set(cases("--full")))
    assert {c[1:] for c in cases("--quick")} == {(1, 32000, "float32"), (8, 32000, "float32")}
    assert cases("--full", "--dtype", "bfloat16", "--configs", "greedy") == [
        ("greedy", b, v, "bfloat16") for v in (32000, 128256) for b in (1, 8, 64)
    ]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--full", "--quick"])


def test_interleaved_timing_keeps_outputs_and_stops_slow_calls_after_three(monkeypatch):
    from vsampler.tools import sampler_benchmark as bm

    clock = iter(range(10_000))
    monkeypatch.setattr(bm.time, "perf_counter", lambda: float(next(clock)))  # every call "takes" 1 s
    monkeypatch.setattr(bm, "SLOW_CALL_S", 0.5)
    calls = {"a": 0}

    def a():
        calls["a"] += 1
        return calls["a"]

    (timing,) = bm.time_interleaved([a], 5)
    assert timing.samples == (1.0, 1.0, 1.0) and calls["a"] == 4 and timing.output == 4  # warm-up + 3
    assert timing.median == 1.0 and timing.spread == 0.0
    monkeypatch.setattr(bm, "SLOW_CALL_S", 2.0)
    fast, other = bm.time_interleaved([a, a], 5)
    assert len(fast.samples) == len(other.samples) == 5
    assert bm.paired_ratios(bm.Timing((2.0, 4.0, 9.0)), bm.Timing((1.0, 2.0))) == [2.0, 2.0]


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--batch", "0"],
        ["bench", "--configs", "nucleus"],
        ["bench", "--dtype", "int8"],
        ["verify", "--draws", "0"],
        ["verify", "--draws", "5,6"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


# before the report test: its reference results and the unpatched xla programs (process_logits, the
# distributions' probabilities) are then this test's, still held
@pytest.mark.statistics
def test_verify_exits_1_on_a_disagreement(monkeypatch):
    from vsampler.core import registry
    from vsampler.impls import xla

    def off_by_one(inp, request):
        tokens, values = xla.sample_with_logprobs(inp, request)
        return (tokens + 1) % inp.logits.shape[1], values

    with registry.replaced("xla", sample=off_by_one):
        argv = [
            "verify",
            "--impl",
            "xla",
            "--batch",
            "2",
            "--vocab",
            "300",
            "--dtype",
            "float32",
            "--draws",
            "3000",
        ]
        assert main(argv) == 1


@pytest.mark.slow
@pytest.mark.interpret  # pallas-triton
@pytest.mark.statistics  # the distribution checks
def test_verify_reports_agreement_exits_0_and_keeps_its_memory_mappings_bounded(monkeypatch, capsys):
    """The report, and its memory: a full `vsampler verify` grid once crashed XLA's compiler past
    vm.max_map_count (each compiled CPU program keeps its mappings); the run drops its compiled programs
    whenever it holds more than the bound, so mappings stay near it however many cases run."""
    from vsampler.tools import verification

    start = verification.mappings()
    if not start:
        pytest.skip("no /proc/self/maps here")
    bound = start + 100
    monkeypatch.setattr(verification, "MAPPINGS_BOUND", bound)
    after_each, released = [], []
    bound_mappings = verification.bound_mappings

    def watched() -> bool:
        released.append(bound_mappings())
        after_each.append(verification.mappings())
        return released[-1]

    monkeypatch.setattr(verification, "bound_mappings", watched)
    argv = ["verify", "--impl", "xla,pallas-triton", "--batch", "2", "--vocab", "300", "--dtype", "float32"]
    code = main([*argv, "--draws", "3000"])  # 10 cases, a dozen compiled programs each
    assert code == EXIT_OK
    assert any(released), "the cases compiled past the bound"
    assert max(after_each) <= bound + 100, "mappings stay near the bound"
    out = capsys.readouterr().out
    # 2 impls x (2 configs + the masked heterogeneous case + 2 textbook top-p cases of 14 rows), each with
    # log-probs in both modes
    summary = "10 cases, 0 disagree; token agreement 68/68 rows (100.00%), 0 at a rounding boundary; "
    assert summary + "distribution checks: 0 failed" in out
    assert "masked" in out and "log-probs" in out
    # piped: a line per finished phase, named for what it does
    assert re.search(r"^verifying: 10/10 done in \d+ s$", out, re.M)
    assert re.search(r"^distribution checks: 6/6 done in \d+ s$", out, re.M)


@pytest.mark.tpu_compile
def test_compile_check_compiles_every_configuration_chunked_where_needed(capsys):
    pytest.importorskip("libtpu")
    code = main(["compile-check", "--tpu", "v4,v5e", "--batch", "8", "--vocab", "1000,128256", "--dtype", "float32"])
    assert code == EXIT_OK
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "4 configurations: 4 compiled, 0 failed, 0 not claimed" in out
    assert "1 use the chunked variant" in out  # v4 at V=128256


@pytest.mark.tpu_compile
def test_compile_check_lowers_the_triton_variant(capsys):
    pytest.importorskip("libtpu")
    code = main(["compile-check", "--tpu", "v5e", "--gpu", "--batch", "4", "--vocab", "1000", "--dtype", "float32"])
    assert code == EXIT_OK
    assert "GPU: 1/1 configurations lowered to Triton" in capsys.readouterr().out


def test_generate_streams_chunks_and_writes_json(tmp_path, capsys):
    out = tmp_path / "gen.json"
    argv = ["generate", "--prompt", "5,6,7", "--prompt", "9", "--max-new-tokens", "6", "--chunks", "2"]
    argv += ["--vocab", "300", "--eos", "250", "--temperature", "1.5", "--top-k", "40", "--json", str(out)]
    assert main(argv) == EXIT_OK
    text = capsys.readouterr().out
    assert "prefill row 0:" in text and "chunk 1 row 1:" in text and "tokens/s" in text
    data = json.loads(out.read_text())
    assert data["prompts"] == [[5, 6, 7], [9]]
    for row, finished in zip(data["generated"], data["finished"], strict=True):
        assert finished and 1 <= len(row) <= 6 and all(0 <= t < 300 for t in row)
        assert len(row) == 6 or row[-1] == 250  # stopped by max tokens or by the EOS id
    assert data["generated_tokens"] == sum(len(r) for r in data["generated"])
    # the same seed gives the same tokens
    assert main([*argv[:-2], "--json", str(tmp_path / "again.json")]) == EXIT_OK
    assert json.loads((tmp_path / "again.json").read_text())["generated"] == data["generated"]


def test_generate_with_a_mask_and_logprobs(tmp_path, capsys):
    out = tmp_path / "gen.json"
    argv = ["generate", "--prompt", "5,6,7", "--prompt", "9", "--max-new-tokens", "5", "--chunks", "2"]
    argv += ["--vocab", "300", "--allowed-ids", "100-119,250", "--eos", "250"]
    argv += ["--logprobs", "3", "--logprobs-mode", "processed"]
    assert main([*argv, "--json", str(out)]) == EXIT_OK
    data = json.loads(out.read_text())
    assert data["logprobs_mode"] == "processed"
    for row, steps in zip(data["generated"], data["logprobs"], strict=True):
        assert all(100 <= t < 120 or t == 250 for t in row)
        assert [s["token"] for s in steps] == row
        for s in steps:
            assert s["logprob"] <= 0.0 and len(s["top"]) == 3
            assert s["top"][0][1] >= s["top"][1][1] >= s["top"][2][1]
            assert s["logprob"] in [v for _, v in s["top"]] or s["logprob"] < s["top"][2][1]
    printed = capsys.readouterr().out
    assert re.search(r"row 0: \d+ \(-?\d+\.\d{3}\)", printed)  # tokens are printed with their log-probabilities


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--allowed-ids", "100-400"], "--allowed-ids names ids outside the vocabulary [0, 300)"),
        (["--logprobs", "65"], "logprobs must be an int in [0, 64]"),
        (["--top-p", "0"], "SamplingParams.top_p must be a float in (0, 1]"),
        (["--prompt-ignore-length", "-1"], "SamplingParams.prompt_ignore_length must be an integer >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--eos", "400"], "eos_token_id [400] outside the model's vocabulary"),
        (["--prompt", "1,2,999"], "outside the model's vocabulary [0, 300)"),
    ],
)
def test_generate_bad_arguments_exit_2_with_the_reason(argv, message, capsys):
    assert main(["generate", "--vocab", "300", "--max-new-tokens", "3", *argv]) == 2
    assert message in capsys.readouterr().err


def test_every_generate_flag_says_what_it_does_and_its_default():
    import argparse

    from vsampler.tools.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    gen = sub.choices["generate"]
    flags = [a for a in gen._actions if a.option_strings and a.dest != "help"]
    for action in flags:
        assert action.help, f"{action.option_strings[0]} has no help"
        if action.default is not None and action.default is not False:
            assert str(action.default) in action.help, f"{action.option_strings[0]}: default not shown"
    sampling = {a.dest: a for a in flags}
    assert "a float in (0, 1] (1 disables it) (default 0.95)" in sampling["top_p"].help  # params' own range
    assert "(default 0.8)" in gen.format_help()


def test_small_figures_keep_three_significant_digits():
    from vsampler.tools.estimate import _us, significant

    assert [significant(v) for v in (0.0048828, 0.052, 41.23, 290.4, 1234.5, 0.0)] == [
        "0.00488",
        "0.0520",
        "41.2",
        "290",
        "1234",
        "0",
    ]
    assert _us(8.74e-9) == "0.00874"  # once "~0 us"


@pytest.mark.tpu_compile
def test_compile_check_piped_is_quiet_and_unwrapped():
    """In a fresh process (libtpu loads once per process) with JAX_PLATFORMS=cpu and stdout piped:
    nothing from libtpu's start-up on stderr, each table row on one line, small figures not ~0."""
    import os
    import subprocess
    import sys

    pytest.importorskip("libtpu")
    argv = ["compile-check", "--tpu", "v5e", "--batch", "1", "--vocab", "1000", "--dtype", "float32"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "COLUMNS": "80"}
    done = subprocess.run(
        [sys.executable, "-m", "vsampler.tools.cli", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stderr == ""
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("│ v5e")]
    assert re.search(r"│ compiled │ resident │ .* MiB +│ ~0\.\d+ us \(floor ~0\.\d+ us\) +│$", row)
    assert "~0 us" not in done.stdout
