"""Smoke tests of the benchmark scripts: each one's --quick run end to end on the CPU, on tiny
shapes, and the schema of what it writes (JSON, CSV, PNG); the summary writer; gpu_check.sh's
syntax and its refusal to run without a GPU unless told to."""

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
TINY = {
    "attention": ["--suites", "finetune,long,modules", "--batch", "2", "--heads", "2", "--seq-lens", "16",
                  "--head-dims", "8", "--long-seq-lens", "32", "--long-tokens", "64", "--no-compile"],
    "layer_norm": ["--rows", "64", "--hidden", "32", "--no-compile"],
    "gelu": ["--rows", "64", "--width", "48", "--no-compile"],
}
BASELINES = {"attention": "torch-sdpa", "layer_norm": "torch-eager", "gelu": "torch-eager"}


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)  # what a user's CPU run sees
    env["MPLBACKEND"] = "Agg"
    return env


@pytest.fixture(scope="module", params=sorted(TINY))
def run(request, tmp_path_factory):
    """(script name, completed process, output folder) of one --quick CPU run on tiny shapes."""
    name = request.param
    out = tmp_path_factory.mktemp(name)
    args = [sys.executable, str(BENCH / f"{name}.py"), "--device", "cpu", "--quick", "--repeats", "2",
            "--warmup", "0", "--threads", "1", "--json", str(out / "r.json"), "--csv", str(out / "r.csv"),
            "--plot", str(out / "r.png"), *TINY[name]]
    if name != "gelu":
        args.append("--no-ceilings")  # one script measures the ceilings, the others save the time
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    return name, result, out


def test_runs_and_says_gpu_not_measured(run):
    name, result, _ = run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "were NOT measured" in result.stdout
    assert BASELINES[name] in result.stdout


def test_the_cpu_note_says_what_its_percentage_of_peak_is_against(run):
    name, result, _ = run
    against = "a float32 matmul" if name == "attention" else "a large (DRAM) copy"  # TFLOP/s or GB/s
    note = next(line for line in result.stdout.splitlines() if line.startswith("NOTE: no GPU"))
    assert f"% of peak is against {against}" in note


def test_json_schema(run):
    name, result, out = run
    payload = json.loads((out / "r.json").read_text())
    assert payload["schema_version"] == common.JSON_SCHEMA_VERSION
    assert payload["columns"] == common.COLUMNS
    assert payload["gpu_kernels_measured"] is False
    for key in ("date", "device", "torch", "git_commit", "command", "timer"):
        assert key in payload["environment"]
    assert payload["environment"]["command"].startswith(f"python benchmarks/{name}.py")
    rows = payload["rows"]
    assert rows
    for row in rows:
        assert list(row) == common.COLUMNS
        assert row["pass"] in common.PASSES
        assert row["ms"] > 0 and row["spread"] >= 0 and row["n"] >= 1
    base = [r for r in rows if r["provider"] == BASELINES[name]]
    assert base and all(abs(r["ratio_vs_baseline"] - 1.0) < 1e-12 for r in base)
    assert {r["pass"] for r in base} == set(common.PASSES)
    checked = [r for r in rows if r["rel_err"] is not None]
    assert checked and not any(r["note"].startswith("MISMATCH") for r in checked)
    if name == "attention":
        attention = [r for r in rows if r["op"] == "attention"]
        assert {r["suite"] for r in attention} == {"finetune", "long"}
        assert all(r["tflops"] > 0 for r in attention)
        assert {r["op"] for r in rows} >= {"MultiheadAttention", "TransformerEncoderLayer"}
        assert any(s["provider"] == "sdpa-cudnn" for s in payload["skipped"])
    else:
        assert all(r["gbps"] > 0 for r in rows)
    if name == "gelu":
        ceilings = payload["ceilings"]
        assert ceilings["copy_gbps"] > 0 and ceilings["matmul_tflops"] > 0
        assert all(r["pct_of_peak"] is not None for r in rows)


def test_csv_matches_json(run):
    """The rows, and on each the run's date, device, versions, commit and command (a CSV copied
    without its JSON still says what it measured)."""
    name, _, out = run
    with open(out / "r.csv", newline="") as f:
        reader = csv.DictReader(f)
        lines = list(reader)
    assert reader.fieldnames == common.COLUMNS + common.CSV_ENVIRONMENT_COLUMNS
    payload = json.loads((out / "r.json").read_text())
    assert len(lines) == len(payload["rows"])
    assert [line["provider"] for line in lines] == [r["provider"] for r in payload["rows"]]
    env = payload["environment"]
    for key in ("date", "device", "torch", "git_commit", "command"):
        assert {line[key] for line in lines} == {env[key]}
    assert lines[0]["command"].startswith(f"python benchmarks/{name}.py")


@pytest.mark.skipif(not HAS_MPL, reason="needs matplotlib")
def test_plot(run):
    _, _, out = run
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weight_and_bias_gradients_are_checked_at_their_own_tolerance():
    """rel_err of a backward pass is that of the input gradients; a weight/bias gradient (a sum
    over rows, looser tolerance) that is off gets its own note, and does not hide an input's."""
    import argparse

    x, bias = torch.randn(16, 8, requires_grad=True), torch.randn(8, requires_grad=True)

    # the same output; the bias gradient 5% off, the x gradient exact
    providers = {"base": lambda: x + bias, "off": lambda: x + bias.detach() + 0.95 * (bias - bias.detach())}
    args = argparse.Namespace(device="cpu", passes=["fwd", "bwd"], warmup=0, repeats=1, dtype="float32",
                              ceilings=None)

    def notes(tolerances):
        rows = common.run_providers("op", providers, "base", [x, bias], (torch.randn(16, 8),), args, label="s",
                                    suite="t", group="g", size=None, work=None, kind="bytes",
                                    tolerances=tolerances, check=True, skips=common.Skips(), failures={},
                                    param_grads_from=1)
        return {r.pass_: (r.rel_err, r.note) for r in rows if r.provider == "off"}

    loose = notes((1e-6, 1e-6, 1e-1))
    assert loose["bwd"][0] < 1e-6 and loose["bwd"][1] == "" and loose["fwd"][1] == ""
    strict = notes((1e-6, 1e-6, 1e-2))
    assert "MISMATCH of a weight/bias gradient (0.05" in strict["bwd"][1] and strict["fwd"][1] == ""


def test_a_device_error_stops_the_run_before_the_next_providers():
    """After a CUDA error (the context is then unusable) the providers that follow are not run and
    blamed for it, and the run stops, with the rows the shape had measured (attached to the error:
    on the CPU the passes are timed together at the end, so here there are none yet)."""
    import argparse

    x = torch.randn(8, 8, requires_grad=True)
    calls = []

    def crashes():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def later():
        calls.append("later")
        return x * 2

    providers = {"base": lambda: x * 2, "crashes": crashes, "later": later}
    args = argparse.Namespace(device="cpu", passes=["fwd"], warmup=0, repeats=1, dtype="float32", ceilings=None)
    failures = {}

    def bench():
        return common.run_providers("op", providers, "base", [x], (torch.ones(8, 8),), args, label="s",
                                    suite="t", group="g", size=None, work=None, kind="flops",
                                    tolerances=(1e-6, 1e-6), check=False, skips=common.Skips(),
                                    failures=failures)

    rows, keep_going = common.guarded("s", failures, bench)
    assert not keep_going and calls == []
    assert "crashes s" in failures and "illegal memory access" in failures["crashes s"]
    assert rows == []
    measured = [common.Row(op="op", provider="base", shape="s", dtype="float32", pass_="fwd", ms=1.0, spread=0.0)]

    def crashes_after_measuring():
        error = RuntimeError("CUDA error: device-side assert triggered")
        error.partial_rows = measured
        raise error

    assert common.guarded("s", failures, crashes_after_measuring) == (measured, False)
    # a plain failure is recorded and the next provider runs
    providers["crashes"] = lambda: (_ for _ in ()).throw(ValueError("unsupported"))
    rows, keep_going = common.guarded("s", failures, bench)
    assert keep_going and calls and {r.provider for r in rows} == {"base", "later"}


@pytest.mark.parametrize("message, fatal", [
    ("CUDA error: an illegal memory access was encountered", True),
    ("Triton Error [CUDA]: misaligned address", True),  # Triton's launcher's wording
    ("Triton Error [CUDA]: unspecified launch failure", True),
    ("CUDA error: device-side assert triggered", True),
    ("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`", True),
    ("CUDA error: out of memory", False),  # the next provider may fit
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmEx( handle, ...)`", False),
    ("head dim 300 is not supported", False),
])
def test_which_errors_end_a_run(message, fatal):
    """Errors that lose the CUDA context end the run (the next provider would be blamed for them);
    the others skip or fail one provider."""
    assert common.fatal_device_error(RuntimeError(message)) == fatal


def test_a_fatal_error_keeps_the_rows_measured_before_it(tmp_path):
    """run_cases stops at a CUDA error but writes what that shape measured before it."""
    import gelu

    out = tmp_path / "r.json"
    args = gelu.parse_args(["--device", "cpu", "--no-ceilings", "--no-compile", "--json", str(out)])
    measured = [common.Row(op="op", provider="base", shape="s", dtype="float32", pass_="fwd", ms=1.0, spread=0.0)]

    def crashes_after_measuring(skips, failures):
        error = RuntimeError("CUDA error: device-side assert triggered")
        error.partial_rows = measured
        raise error

    def never(skips, failures):
        raise AssertionError("a case after a fatal error ran")

    cases = [common.Case("s", crashes_after_measuring), common.Case("t", never)]
    assert common.run_cases(args, cases, baseline="base", plot_x_label="x", plot_title="t") == 1
    assert [row["provider"] for row in json.loads(out.read_text())["rows"]] == ["base"]


def test_sigterm_writes_the_results_and_exits_143(tmp_path):
    """SIGTERM (what `timeout` sends) mid-run: the rows measured so far are written, and the exit
    status says the run was cut short (128 + 15), not that it finished."""
    import signal

    import gelu

    out = tmp_path / "r.json"
    args = gelu.parse_args(["--device", "cpu", "--no-ceilings", "--no-compile", "--json", str(out)])
    measured = [common.Row(op="op", provider="base", shape="s", dtype="float32", pass_="fwd", ms=1.0, spread=0.0)]

    def killed_while_measuring(skips, failures):
        signal.raise_signal(signal.SIGTERM)  # run_cases' handler raises Stop here

    previous = signal.getsignal(signal.SIGTERM)
    try:
        cases = [common.Case("s", lambda skips, failures: measured), common.Case("t", killed_while_measuring)]
        assert common.run_cases(args, cases, baseline="base", plot_x_label="x", plot_title="t") == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    payload = json.loads(out.read_text())
    assert [row["provider"] for row in payload["rows"]] == ["base"] and payload["stopped_early"]


def test_the_results_so_far_are_on_disk_after_each_shape(tmp_path):
    """A run killed outright (a hung kernel ignores SIGTERM; `timeout` then kills it) keeps every
    shape it finished: --json and --csv are rewritten whole after each one, marked not final."""
    import gelu

    out, table = tmp_path / "r.json", tmp_path / "r.csv"
    args = gelu.parse_args(["--device", "cpu", "--no-ceilings", "--no-compile", "--json", str(out),
                            "--csv", str(table)])
    measured = [common.Row(op="op", provider="base", shape="s", dtype="float32", pass_="fwd", ms=1.0, spread=0.0)]
    seen = []

    def reads_the_files(skips, failures):
        payload = json.loads(out.read_text())
        seen.append(([row["provider"] for row in payload["rows"]], payload["final"], table.read_text().count("\n")))
        return []

    cases = [common.Case("s", lambda skips, failures: measured), common.Case("t", reads_the_files)]
    assert common.run_cases(args, cases, baseline="base", plot_x_label="x", plot_title="t") == 0
    assert seen == [(["base"], False, 2)] and json.loads(out.read_text())["final"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r.csv", "r.json"]  # no partial files left


def test_a_copy_without_git_records_the_commit_it_is_told(monkeypatch):
    monkeypatch.delenv(common.COMMIT_ENV_VAR, raising=False)
    assert common.git_commit() != "unknown"  # this checkout
    monkeypatch.setattr(common, "_git", lambda *args: None)  # no .git (a copied working tree)
    assert common.git_commit() == "unknown"
    monkeypatch.setenv(common.COMMIT_ENV_VAR, "1e52125 ")
    assert common.git_commit() == "1e52125" and common.environment("cpu")["git_commit"] == "1e52125"
    monkeypatch.undo()
    monkeypatch.setenv(common.COMMIT_ENV_VAR, "1e52125")
    assert common.git_commit() == "1e52125"  # also inside a git checkout (maybe another repository's)


def test_the_cuda_backend_runs_last_of_the_providers():
    """A memory fault of a hand-written kernel loses the CUDA context and ends the run: fastformer's
    other backends run before it, in every script."""
    import fastformer

    order = common.fastformer_backends()
    assert sorted(order) == sorted(fastformer.available_backends()) and order[-1] == "cuda"
    for script in ("attention", "layer_norm", "gelu"):
        source = (BENCH / f"{script}.py").read_text()
        assert "in common.fastformer_backends():" in source and "in fastformer.available_backends()" not in source


def test_the_budget_counts_from_the_process_start_and_looks_one_shape_ahead():
    assert common._process_age() > 0  # (Linux: /proc/self/stat)
    assert abs(common.Budget(None).elapsed() - common._process_age()) < 1
    budget = common.Budget(10.0)
    budget.start = time.monotonic() - 5  # 5 s in
    assert not budget.exhausted()
    budget.case_took(4)  # 9 s if the next shape takes as long
    assert not budget.exhausted()
    budget.case_took(6)  # 11 s: past the budget, so it is not started
    assert budget.exhausted() and budget.stopped_early
    assert not common.Budget(None).exhausted()


def test_useful_flops_count_only_real_tokens():
    import attention

    assert attention.forward_flops(2, 8, [16, 16], False) == 4 * 2 * 8 * 16 * 16 * 2
    assert attention.forward_flops(2, 8, [4, 16], False) == 4 * 2 * 8 * (4 * 4 + 16 * 16)
    assert attention.forward_flops(2, 8, [4, 16], True) == 2 * 2 * 8 * (4 * 4 + 16 * 16)


@pytest.mark.parametrize("run", ["attention"], indirect=True)
def test_summary(run, tmp_path):
    name, _, out = run
    shutil.copy(out / "r.json", tmp_path / f"{name}.json")
    (tmp_path / "steps.tsv").write_text("step\tstatus\tseconds\tnote\nbuild\tFAIL\t3\texit 1\n"
                                        f"{name}\tpass\t9\t\n")
    result = subprocess.run([sys.executable, str(BENCH / "summarize.py"), str(tmp_path), "--cpu-run", "1"],
                            capture_output=True, text=True, timeout=120, env=_env())
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "summary.md").read_text()
    assert "1 step(s) not passed" in text and "| build | **FAIL** |" in text
    assert f"## {name}" in text and BASELINES[name] in text
    assert "GPU kernels not measured" in text


def test_summary_tallies_a_test_run_cut_short(tmp_path):
    """gpu_check.sh runs pytest -v: when its timeout cuts the run short there is no final tally,
    and the summary counts the per-test lines instead."""
    import summarize

    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "tests.log"
    log.write_text("[gw0] [  1%] PASSED tests/test_a.py::test_x[1-2]\n"
                   "[gw1] [  2%] FAILED tests/test_b.py::test_y\n"
                   "tests/test_a.py::test_z SKIPPED (needs a CUDA GPU)         [  3%]\n"
                   "[gw0] [  4%] PASSED tests/test_a.py::test_x[3-4]\n")
    assert summarize._pytest_line(tmp_path) == "cut short, per-test lines so far: 2 passed, 1 failed, 1 skipped"
    log.write_text(log.read_text() + "==== 1 failed, 2 passed, 1 skipped in 9.1s ====\n")
    assert summarize._pytest_line(tmp_path) == "1 failed, 2 passed, 1 skipped in 9.1s"


@pytest.mark.parametrize("script", ["gpu_check.sh", "fetch_wheels.sh"])
def test_shell_scripts(script):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    assert subprocess.run([bash, "-n", str(BENCH / script)]).returncode == 0
    result = subprocess.run([bash, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_check_needs_gpu_or_cpu_ok(tmp_path):
    env = _env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    result = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--python", sys.executable,
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "--cpu-ok" in result.stderr


def test_gelu_with_dropout_times_the_fused_op_against_gelu_then_dropout(tmp_path):
    """--dropout: fastformer's fused dropout against F.dropout after the GELU; no output check
    (each provider draws its own mask), every pass timed."""
    import gelu

    out = tmp_path / "r.json"
    args = gelu.parse_args(["--device", "cpu", "--no-ceilings", "--no-compile", "--quick", "--repeats", "2",
                            "--warmup", "0", "--rows", "16", "--width", "32", "--approximate", "tanh",
                            "--dropout", "0.2", "--providers", "torch-eager,fastformer-torch", "--json", str(out)])
    assert gelu.run(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(row["provider"], row["pass"]) for row in rows} == {
        (provider, pass_) for provider in ("torch-eager", "fastformer-torch") for pass_ in ("fwd", "bwd", "fwd+bwd")}
    assert all("dropout=0.2" in row["shape"] for row in rows)


def test_micro_benchmarks_run(tmp_path):
    """benchmarks/micro, each benchmark run once (not timed): they live outside tests/ and
    follow the backend interface through null_backend.py, which must keep up with it."""
    pytest.importorskip("pytest_benchmark")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                             "--rootdir", str(ROOT), str(BENCH / "micro")],
                            capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The overhead and layer-step groups run on any machine (a skip there would hide them).
    passed = re.search(r"\b(\d+) passed", result.stdout)
    assert passed and int(passed[1]) >= 8, result.stdout[-3000:]


def test_modules_suite_runs_sequence_first_modules(tmp_path):
    """--seq-first: nn.MultiheadAttention / nn.TransformerEncoderLayer with batch_first=False (the
    default of both) against their fastformer versions, outputs and gradients checked (dropout 0)."""
    import attention

    out = tmp_path / "r.json"
    args = attention.parse_args(["--device", "cpu", "--no-ceilings", "--no-compile", "--quick", "--repeats", "2",
                                 "--warmup", "0", "--suites", "modules", "--seq-first", "--module-dropout", "0",
                                 "-B", "2", "-H", "2", "-L", "16", "-D", "8", "--json", str(out)])
    assert attention.run(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {row["provider"] for row in rows} == {"torch.nn", "fastformer"}
    assert all(row["shape"].endswith("seq-first") for row in rows) and len(rows) == 12


def test_attention_deterministic_runs_under_deterministic_algorithms_and_records_it(tmp_path, monkeypatch):
    """--deterministic: the run sees torch.use_deterministic_algorithms(True) (so the fast attention
    backward takes its dQ kernel), the environment records it, and the setting is restored after."""
    import attention

    seen = []
    bench = attention.bench_attention
    monkeypatch.setattr(attention, "bench_attention", lambda *a, **k: seen.append(
        torch.are_deterministic_algorithms_enabled()) or bench(*a, **k))
    out = tmp_path / "r.json"
    args = attention.parse_args(["--device", "cpu", "--no-ceilings", "--no-compile", "--quick", "--repeats", "2",
                                 "--warmup", "0", "--suites", "finetune", "--padding", "no", "-B", "2", "-H", "2",
                                 "-L", "16", "-D", "8", "--providers", "torch-sdpa,fastformer-torch",
                                 "--deterministic", "--json", str(out)])
    before = torch.are_deterministic_algorithms_enabled()
    assert attention.run(args) == 0
    assert seen == [True] and torch.are_deterministic_algorithms_enabled() == before
    assert json.loads(out.read_text())["environment"]["deterministic_algorithms"] is True


def test_attention_position_bias_gets_its_gradient_checked_against_sdpa(tmp_path, monkeypatch):
    """--position-bias: a learned (1, H, L, L) bias that requires grad is one of the differentiated
    inputs of every provider (fastformer's as attn_mask, SDPA's with the padding folded in), and
    the providers' gradients of it agree with SDPA's."""
    import attention
    import common

    differentiated = []
    run_providers = common.run_providers
    monkeypatch.setattr(common, "run_providers", lambda op, providers, baseline, grad_inputs, *a, **k: (
        differentiated.append(grad_inputs), run_providers(op, providers, baseline, grad_inputs, *a, **k))[1])
    out = tmp_path / "r.json"
    args = attention.parse_args(["--device", "cpu", "--no-ceilings", "--no-compile", "--repeats", "2", "--warmup",
                                 "0", "--suites", "finetune", "--padding", "both", "--causal", "-B", "2", "-H", "2",
                                 "-L", "24", "-D", "8", "--providers", "torch-sdpa,sdpa-math,fastformer-torch",
                                 "--position-bias", "--json", str(out)])
    assert attention.run(args) == 0
    assert [tuple(t.shape) for t in differentiated[0]][3:] == [(1, 2, 24, 24)]
    rows = json.loads(out.read_text())["rows"]
    assert {row["provider"] for row in rows} == {"torch-sdpa", "sdpa-math", "fastformer-torch"}
    assert all(row["shape"].endswith("+bias") for row in rows) and len(rows) == 18
    assert all(row["rel_err"] < 1e-5 for row in rows if row["provider"] != "torch-sdpa")


@pytest.mark.parametrize("flag", ["--compile", None])
def test_attention_says_why_a_compiled_provider_skips_a_cpu_shape(flag, tmp_path, monkeypatch):
    """On the CPU the torch.compile providers run only with --compile, and then on the first shape
    of each suite: a later shape's skip says so, not that --compile is missing."""
    import attention
    import common

    monkeypatch.setattr(common, "compile_fn", lambda fn, **kwargs: fn)  # the policy, not compile time
    out = tmp_path / "r.json"
    args = attention.parse_args(["--device", "cpu", "--no-ceilings", "--quick", "--repeats", "1", "--warmup", "0",
                                 "--suites", "finetune,modules", "--padding", "no", "-B", "2", "-H", "2",
                                 "-L", "16,32", "-D", "8", "--passes", "fwd", "--providers", "compile",
                                 "--json", str(out), *([flag] if flag else [])])
    assert attention.run(args) == 0
    payload = json.loads(out.read_text())
    compiled = {row["shape"] for row in payload["rows"] if "compile" in row["provider"]}
    reasons = {entry["reason"] for entry in payload["skipped"] if "compile" in entry["provider"]}
    if flag:
        assert len(compiled) == 2  # the first shape of each suite
        assert reasons == {"on the CPU: torch.compile providers run on the first shape of each suite only "
                           "(compile time)"}
    else:
        assert not compiled
        assert reasons == {"on the CPU torch.compile providers run only with --compile (compile time)"}


@pytest.mark.parametrize("script", ["attention", "layer_norm", "gelu"])
def test_a_providers_typo_is_an_error_not_a_baseline_only_run(script):
    """--providers parts that name no provider of the script (a typo) stop it with the known names;
    a run that compares nothing must not pass for a complete one."""
    result = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", "--providers", "trition"],
                            capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 2
    assert "'trition' names no provider" in result.stderr and "fastformer-triton" in result.stderr
    assert common.unmatched_selection("triton,sdpa-math", ["fastformer-triton", "sdpa-math"]) == []


@pytest.mark.parametrize("selection", ["", ",", " , "])
@pytest.mark.parametrize("script", ["attention", "layer_norm", "gelu"])
def test_an_empty_providers_list_is_an_error_not_a_baseline_only_run(script, selection, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exited:
        module.parse_args(["--device", "cpu", "--providers", selection])
    assert exited.value.code == 2
    assert f"--providers {selection!r} names no provider" in capsys.readouterr().err


def _row(provider, shape, suite, ms, pass_="fwd"):
    return common.Row(op="attention", provider=provider, shape=shape, dtype="float32", pass_=pass_, ms=ms,
                      spread=0.1, gbps=10.0 * ms, suite=suite, group="g", size=int(ms))


def test_summary_table_keeps_same_shapes_of_two_suites_apart():
    rows = [_row("a", "B=4 L=256", "finetune", 1.0), _row("a", "B=4 L=256", "long", 2.0),
            _row("a", "B=2 L=64", "finetune", 3.0)]
    table = common.markdown_pivot(rows, "fwd")
    assert "B=4 L=256 (finetune)" in table and "B=4 L=256 (long)" in table
    assert "| B=2 L=64 |" in table  # only one suite measured it: no suite in its label
    assert len([line for line in table.splitlines() if line.startswith("| attention")]) == 3


def test_summary_tables_mark_results_that_differ_from_the_baseline():
    """A fast but wrong kernel must not read as a speed-up in a headline table."""
    import dataclasses

    wrong = dataclasses.replace(_row("b", "s", "x", 1.0), note="MISMATCH: rel err 0.3 > 0.025")
    rows = [_row("a", "s", "x", 2.0), wrong]
    for value in ("ms", "rate"):
        line = next(line for line in common.markdown_pivot(rows, "fwd", value).splitlines()
                    if line.startswith("| attention"))
        right, marked = line.split("|")[4:6]
        assert "MISMATCH" in marked and "MISMATCH" not in right, line


@pytest.mark.skipif(not HAS_MPL, reason="needs matplotlib")
def test_plot_of_a_backward_only_run(tmp_path):
    rows = [_row("a", "s1", "x", 2.0, "bwd"), _row("a", "s2", "x", 4.0, "bwd")]
    assert common.plot_rows(rows, tmp_path / "bwd.png", x_label="L", title="t")
    assert (tmp_path / "bwd.png").stat().st_size > 0


@pytest.mark.parametrize("script", ["attention", "layer_norm", "gelu"])
def test_a_plot_name_is_checked_before_the_run(script, tmp_path, capsys):
    """An extension matplotlib cannot write stops the script at once (it failed after the whole
    run); a name without one is the file written, NAME.png, and reported as such."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exited:
        module.parse_args(["--device", "cpu", "--plot", str(tmp_path / "r.xyz")])
    assert exited.value.code == 2
    assert "matplotlib cannot write .xyz files" in capsys.readouterr().err
    args = module.parse_args(["--device", "cpu", "--plot", str(tmp_path / "r")])
    assert args.plot == tmp_path / "r.png"
    assert module.parse_args(["--device", "cpu", "--plot", str(tmp_path / "r.SVG")]).plot == tmp_path / "r.SVG"


def test_check_plot_path_for_any_script(tmp_path, capsys):
    """The check other scripts (finetune.py) call after parse_args: a folder is no file name."""
    import argparse

    parser = argparse.ArgumentParser()
    assert common.check_plot_path(parser, None) is None
    assert common.check_plot_path(parser, tmp_path / "a.pdf") == tmp_path / "a.pdf"
    with pytest.raises(SystemExit):
        common.check_plot_path(parser, tmp_path)
    assert "not a folder" in capsys.readouterr().err
    if HAS_MPL:
        path = common.check_plot_path(parser, str(tmp_path / "noext"))
        assert common.plot_rows([_row("a", "s1", "x", 2.0), _row("a", "s2", "x", 4.0)], path, x_label="L", title="t")
        assert [p.name for p in tmp_path.iterdir()] == ["noext.png"]


def test_command_under_torchrun_names_the_launcher(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(BENCH / "finetune.py"), "--quick"])
    assert common.command_line() == "python benchmarks/finetune.py --quick"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert common.command_line() == "torchrun --nnodes 2 --nproc_per_node 2 benchmarks/finetune.py --quick"


def test_modules_suite_takes_every_head_count_and_dim():
    import attention  # benchmarks/attention.py

    args = attention.parse_args(["--suites", "modules", "-H", "2,4", "-D", "8,16", "-L", "16,32", "--device", "cpu"])
    shapes = attention.module_shapes(args)
    assert {(s.heads, s.head_dim, s.seq_len) for s in shapes} == {
        (h, d, L) for h in (2, 4) for d in (8, 16) for L in (16, 32)}


def test_environment_records_no_user_path(monkeypatch):
    import fastformer

    reason = "fastformer._C cannot be loaded (ImportError: /home/someone/src/fastformer/_C.cpython-311.so: undefined"
    monkeypatch.setattr(fastformer, "available_backends", lambda: {"cuda": [reason], "torch": []})
    backends = common.environment("cpu")["fastformer_backends"]
    assert backends["torch"] == "available"
    assert backends["cuda"] == "fastformer._C cannot be loaded (ImportError: _C.cpython-311.so: undefined"
    assert common.without_paths("see /a/b/c.txt and ./d/e, http://x/y") == "see c.txt and ./d/e, http://x/y"
