"""benchmarks/gpu_check.sh's choices, checked on any machine in a few seconds: which IMDB data the
fine-tuning step gets, --skip against the time budget, --skip's step names, the test step's
workers; benchmarks/finetune_gpu.sh's runs and time boxes (with a stand-in finetune.py); and
whether benchmarks/summarize.py takes a folder for a CPU-only run from its files. Stand-ins for
nvidia-smi (and, where a GPU is pretended, for Python's answers about it) keep the script off
the real machine's GPU and the steps that take minutes out of it."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import summarize  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")

STEPS = ("env wheels build install-without-cuda extension info tests attention layer_norm gelu memcheck racecheck "
         "finetune").split()
# Leaves only the fine-tuning step (and the summary) to run.
ALL_BUT_FINETUNE = "env,info,tests,attention,layer_norm,gelu"

# Writes the arguments it was given into its --json file instead of training anything.
FINETUNE_STUB = """import json, sys
if "--help" in sys.argv:
    print("usage: finetune.py [--data DATA] [--synthetic] [--quick] [--json JSON]")
else:
    with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
        json.dump(sys.argv[1:], f)
"""
SUMMARIZE_STUB = "import pathlib, sys; (pathlib.Path(sys.argv[1]) / 'summary.md').write_text('stub')\n"


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _env(tmp_path: Path, gpu: bool = False, **variables) -> dict:
    """The environment of a run: a stand-in nvidia-smi first on PATH (no GPU, or a pretended one with a
    compute-sanitizer), the IMDB variables only as given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if gpu:
        _executable(bin_dir / "nvidia-smi", '#!/bin/sh\ncase "$*" in *-L*) echo "GPU 0: Pretend";; '
                                            '*) echo Pretend;; esac\n')
        _executable(bin_dir / "compute-sanitizer", "#!/bin/sh\nexit 0\n")
    else:
        _executable(bin_dir / "nvidia-smi", "#!/bin/sh\nexit 9\n")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTFORMER_IMDB", "FASTFORMER_IMDB_DATA")}
    env["PATH"] = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), env.get("PATH", "")])
    env.update(variables)
    return env


def _gpu_check(script: Path, out: Path, env: dict, *args, python=sys.executable):
    return subprocess.run(["bash", str(script), "--python", str(python), "--no-install", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=out.parent)


def _steps(out: Path) -> dict:
    lines = (out / "steps.tsv").read_text().splitlines()[1:]
    return {line.split("\t")[0]: line.split("\t")[1:] for line in lines}


# ---- which data the fine-tuning step gets -------------------------------------------------------
@pytest.fixture
def checkout(tmp_path):
    """A checkout holding gpu_check.sh and stand-ins for finetune.py and summarize.py."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(BENCH / "gpu_check.sh", repo / "benchmarks")
    (repo / "benchmarks" / "finetune.py").write_text(FINETUNE_STUB)
    (repo / "benchmarks" / "summarize.py").write_text(SUMMARIZE_STUB)
    return repo


@pytest.mark.parametrize("variable", ["FASTFORMER_IMDB_DATA", "FASTFORMER_IMDB"])
def test_finetune_reads_the_data_folder_from_the_environment(checkout, tmp_path, variable):
    """FASTFORMER_IMDB_DATA is the variable finetune.py and the README name; FASTFORMER_IMDB, the
    one gpu_check.sh's help named, still works. Either: that folder, not synthetic reviews."""
    data = tmp_path / "imdb"
    data.mkdir()
    out = tmp_path / "out"
    result = _gpu_check(checkout / "benchmarks" / "gpu_check.sh", out, _env(tmp_path, **{variable: str(data)}),
                        "--cpu-ok", "--skip", ALL_BUT_FINETUNE)
    assert _steps(out)["finetune"][0] == "pass", result.stdout + result.stderr
    argv = json.loads((out / "finetune.json").read_text())
    assert "--synthetic" not in argv and argv[argv.index("--data") + 1] == str(data)


def test_the_documented_variable_wins_over_its_older_name(checkout, tmp_path):
    out = tmp_path / "out"
    _gpu_check(checkout / "benchmarks" / "gpu_check.sh", out,
               _env(tmp_path, FASTFORMER_IMDB_DATA="hf", FASTFORMER_IMDB=str(tmp_path)), "--cpu-ok",
               "--skip", ALL_BUT_FINETUNE)
    argv = json.loads((out / "finetune.json").read_text())
    assert argv[argv.index("--data") + 1] == "hf"  # finetune.py's name for the download, not a folder


def test_finetune_uses_acl_imdb_in_the_checkout_as_finetune_py_would(checkout, tmp_path):
    (checkout / "aclImdb").mkdir()
    out = tmp_path / "out"
    _gpu_check(checkout / "benchmarks" / "gpu_check.sh", out, _env(tmp_path), "--cpu-ok", "--skip", ALL_BUT_FINETUNE)
    argv = json.loads((out / "finetune.json").read_text())
    assert argv[argv.index("--data") + 1] == str(checkout / "aclImdb") and "--synthetic" not in argv


def test_finetune_falls_back_to_synthetic_reviews_only_without_data(checkout, tmp_path):
    out = tmp_path / "out"
    _gpu_check(checkout / "benchmarks" / "gpu_check.sh", out, _env(tmp_path), "--cpu-ok", "--skip", ALL_BUT_FINETUNE)
    argv = json.loads((out / "finetune.json").read_text())
    assert "--synthetic" in argv and "--data" not in argv


def test_a_benchmark_is_not_started_without_the_time_to_finish(checkout, tmp_path):
    """25 s left (45 s of budget less the summary's 20): too little for any of the benchmarks,
    whose limits are longer; each is reported as not run (a fault), none is started."""
    for name in ("attention", "layer_norm", "gelu"):
        (checkout / "benchmarks" / f"{name}.py").write_text(
            f"import pathlib; pathlib.Path({str(tmp_path / 'started')!r}).write_text('{name}')\n")
    out = tmp_path / "out"
    result = _gpu_check(checkout / "benchmarks" / "gpu_check.sh", out, _env(tmp_path), "--cpu-ok", "--budget", "45",
                        "--skip", "env,info,tests,memcheck,racecheck,finetune")
    steps = _steps(out)
    assert result.returncode == 1, result.stdout + result.stderr
    assert [steps[name][0] for name in ("attention", "layer_norm", "gelu")] == ["not-run"] * 3, steps
    assert "time budget used up" in steps["attention"][2] and not (tmp_path / "started").exists()


# ---- --skip against the time budget -------------------------------------------------------------
def test_skipped_steps_are_skipped_when_the_budget_is_short(tmp_path):
    """Everything but the summary left out, 35 s of budget (15 s once the
    summary's 20 s are kept back). Nothing ran out of time: every step is skipped, exit 0."""
    out = tmp_path / "out"
    result = _gpu_check(BENCH / "gpu_check.sh", out, _env(tmp_path), "--cpu-ok", "--budget", "35",
                        "--skip", ALL_BUT_FINETUNE + ",finetune")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _steps(out)["finetune"][:1] == ["skipped"]
    assert {status for status, *_ in _steps(out).values()} == {"skipped"}


def test_every_step_skipped_on_a_gpu_is_skipped_whatever_else_is_true(tmp_path):
    """On a (pretended) GPU without fastformer._C, the extension check fails and the sanitizer
    steps have nothing to check, and the budget is short: each of them is still only skipped when
    the caller left it out."""
    python = _executable(tmp_path / "python", f"""#!/bin/sh
case "$*" in
  *torch.cuda.is_available*) exit 0 ;;
  *load_extension*) exit 1 ;;
esac
exec "{sys.executable}" "$@"
""")
    out = tmp_path / "out"
    result = _gpu_check(BENCH / "gpu_check.sh", out, _env(tmp_path, gpu=True), "--budget", "35",
                        "--skip", ",".join(STEPS), python=python)
    assert "GPU: Pretend" in result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    steps = _steps(out)
    assert {name: status for name, (status, *_) in steps.items()} == {name: "skipped" for name in steps}
    assert {"extension", "memcheck", "racecheck", "finetune"} <= set(steps)


@pytest.mark.parametrize("xdist_version, cores, expected", [
    ("3.8.0", 16, ["-n", "12", "--dist", "worksteal"]), ("3.1.0", 16, ["-n", "12", "--dist", "load"]),
    ("3.8.0", 64, ["-n", "12", "--dist", "worksteal"]), ("3.8.0", 4, []),
])
def test_the_gpu_tests_are_shared_out_one_by_one(tmp_path, xdist_version, cores, expected):
    """On a (pretended) GPU with pytest-xdist, the test step hands tests to up to 12 workers one by
    one, not a file to each (test_attention.py alone compiles ~900 Triton kernels), and leaves out
    the CPU-only files that CI runs."""
    argv_file = tmp_path / "pytest-argv.json"
    python = _executable(tmp_path / "python", f"""#!/bin/sh
case "$*" in
  *torch.cuda.is_available*) exit 0 ;;
  *"find_spec('xdist')"*) exit 0 ;;
  *xdist.__version__*) exec "{sys.executable}" -c "import sys; sys.modules['xdist'] = type(sys)('xdist'); \
sys.modules['xdist'].__version__ = '{xdist_version}'; exec(sys.argv[1])" "$2" ;;
  "-m pytest"*) exec "{sys.executable}" -c \
"import json, sys; json.dump(sys.argv[1:], open('{argv_file}', 'w'))" "$@" ;;
esac
exec "{sys.executable}" "$@"
""")
    env = _env(tmp_path, gpu=True)
    _executable(tmp_path / "bin" / "nproc", f"#!/bin/sh\necho {cores}\n")
    out = tmp_path / "out"
    skip = ",".join(step for step in STEPS if step != "tests")
    result = _gpu_check(BENCH / "gpu_check.sh", out, env, "--budget", "60", "--skip", skip, python=python)
    assert _steps(out)["tests"][0] == "pass", result.stdout + result.stderr
    argv = json.loads(argv_file.read_text())
    cpu_only = {"--ignore=tests/test_triton_compile.py", "--ignore=tests/test_cuda_emulated.py"}
    assert cpu_only | {"--durations=30"} <= set(argv)
    workers = argv[argv.index("-n"):argv.index("-n") + 4] if "-n" in argv else []
    assert workers == expected


# ---- --skip's step names ------------------------------------------------------------------------
@pytest.mark.parametrize("names", ["test", "env,fine-tune", "summary"])
def test_skip_refuses_a_step_that_does_not_exist(tmp_path, names):
    out = tmp_path / "out"
    # A short budget, so that a script that ran the steps anyway would still fail fast.
    result = _gpu_check(BENCH / "gpu_check.sh", out, _env(tmp_path), "--cpu-ok", "--budget", "25",
                        "--skip", names)
    assert result.returncode == 2, result.stdout + result.stderr
    wrong = names.split(",")[-1]
    assert f"no step '{wrong}'" in result.stderr and all(name in result.stderr for name in STEPS)
    assert not out.exists()


def test_skip_takes_spaces_and_repeats(tmp_path):
    out = tmp_path / "out"
    result = _gpu_check(BENCH / "gpu_check.sh", out, _env(tmp_path), "--cpu-ok", "--budget", "35",
                        "--skip", "env, info,tests", "--skip", "attention,layer_norm,gelu,finetune")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {status for status, *_ in _steps(out).values()} == {"skipped"}


# ---- finetune_gpu.sh: the fine-tuning benchmark's GPU runs -------------------------------------
# Records its arguments in a JSON list per call, writes the files it is asked for; sleeps when told.
RUN_RECORDER = """import json, os, sys, time
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "--epochs" in sys.argv and os.environ.get("SLOW_EPOCHS"):
    time.sleep(int(os.environ["SLOW_EPOCHS"]))
for flag in ("--json", "--plot", "--table"):
    open(sys.argv[sys.argv.index(flag) + 1], "w").write("{}")
"""


def _finetune_gpu(tmp_path: Path, *args, **env_vars):
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(BENCH / "finetune_gpu.sh", repo / "benchmarks")
    (repo / "benchmarks" / "finetune.py").write_text(RUN_RECORDER)
    (tmp_path / "imdb").mkdir(exist_ok=True)
    env = {**os.environ, "RECORD": str(tmp_path / "calls.jsonl"), **env_vars}
    result = subprocess.run(["bash", str(repo / "benchmarks" / "finetune_gpu.sh"), "--python", sys.executable,
                             "--data", str(tmp_path / "imdb"), "--out", str(tmp_path / "out"), *args],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    record = tmp_path / "calls.jsonl"
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return result, calls


def test_finetune_gpu_runs_quick_then_both_models_for_an_epoch(tmp_path):
    (tmp_path / "minilm").mkdir()
    result, calls = _finetune_gpu(tmp_path, "--minilm-path", "minilm", "--archive", "runs.tar.gz")
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out"
    assert [call[:3] for call in calls] == [["--data", str(tmp_path / "imdb"), "--quick"],
                                          ["--data", str(tmp_path / "imdb"), "--epochs"],
                                          ["--data", str(tmp_path / "imdb"), "--model"]]
    assert calls[2][3:7] == ["minilm", "--epochs", "1", "--minilm-path"] and calls[2][7] == str(tmp_path / "minilm")
    for name, call in zip(("quick", "scratch", "minilm"), calls):
        assert call[call.index("--json") + 1] == str(out / f"finetune-{name}-gpu.json")
        assert (out / f"finetune-{name}-gpu.md").exists() and (out / "logs" / f"{name}.log").exists()
    packed = subprocess.run(["tar", "-tzf", str(tmp_path / "runs.tar.gz")], capture_output=True, text=True).stdout
    assert "finetune-minilm-gpu.png" in packed and "logs/quick.log" in packed


def test_finetune_gpu_time_boxes_each_run_within_the_budget(tmp_path):
    """A run that outlasts what is left of the budget is stopped and reported; the runs after it
    that no longer fit are not started; the exit status says so."""
    result, calls = _finetune_gpu(tmp_path, "--budget", "40", SLOW_EPOCHS="60")
    assert result.returncode == 1
    assert [call[2] for call in calls] == ["--quick", "--epochs"]
    assert "scratch: TIMEOUT" in result.stdout and "minilm not run: time budget used up" in result.stdout


def test_finetune_gpu_runs_what_it_is_asked_to(tmp_path):
    """--runs scratch,minilm after gpu_check.sh's finetune step ran --quick; a misspelt run is refused."""
    result, calls = _finetune_gpu(tmp_path, "--runs", "scratch, minilm")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [call[2] for call in calls] == ["--epochs", "--model"]
    result, calls = _finetune_gpu(tmp_path / "again", "--runs", "scratch,minlm")
    assert result.returncode == 2 and "--runs: no run 'minlm'" in result.stderr and calls == []


def test_finetune_gpu_needs_the_data(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTFORMER_IMDB_DATA"}
    result = subprocess.run(["bash", str(BENCH / "finetune_gpu.sh")], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 2 and "--data DIR is needed" in result.stderr


# ---- summarize.py: CPU-only folders ------------------------------------------------------------
def _folder(tmp_path: Path, on_gpu: bool) -> Path:
    """A gpu_check.sh folder with the committed CPU attention results, or the same relabelled as
    measured on a GPU."""
    payload = json.loads((BENCH / "results" / "attention-cpu-float32.json").read_text())
    if on_gpu:
        payload["gpu_kernels_measured"] = True
        payload["environment"].update(device_type="cuda", device="Pretend GPU")
    out = tmp_path / ("gpu" if on_gpu else "cpu")
    out.mkdir()
    (out / "attention.json").write_text(json.dumps(payload))
    (out / "steps.tsv").write_text("step\tstatus\tseconds\tnote\nattention\tpass\t9\t\n")
    return out


def test_resummarizing_a_cpu_run_keeps_its_banner(tmp_path):
    """`summarize.py DIR` with no --cpu-run: the folder's JSON says the GPU kernels were not measured."""
    out = _folder(tmp_path, on_gpu=False)
    assert summarize.main([str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert "GPU kernels not measured" in text and text.startswith("# fastformer GPU check (CPU-only run)")
    assert summarize.main([str(out), "--cpu-run", "0"]) == 0  # still an override
    assert "GPU kernels not measured" not in (out / "summary.md").read_text().split("## attention")[0]


@pytest.mark.parametrize("name, payload", [
    ("finetune.json", {"environment": {"device_type": "cpu"}}),
    ("info.json", {"devices": [], "backends": {}}),
])
def test_a_cpu_run_is_told_from_the_other_json_files(tmp_path, name, payload):
    (tmp_path / name).write_text(json.dumps(payload))
    assert summarize.main([str(tmp_path)]) == 0
    assert "GPU kernels not measured" in (tmp_path / "summary.md").read_text()


def test_readme_refuses_a_cpu_run(tmp_path, capsys):
    out = _folder(tmp_path, on_gpu=False)
    with pytest.raises(SystemExit) as exit_:
        summarize.main([str(out), "--readme"])
    assert exit_.value.code not in (0, None) and "did not measure the GPU kernels" in str(exit_.value.code)
    assert capsys.readouterr().out == ""


def test_a_gpu_run_is_summarized_and_headlined_as_one(tmp_path, capsys):
    out = _folder(tmp_path, on_gpu=True)
    assert summarize.main([str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert text.startswith("# fastformer GPU check\n") and "GPU kernels not measured" not in text
    assert summarize.main([str(out), "--readme"]) == 0
    assert "on Pretend GPU" in capsys.readouterr().out


def test_a_gpu_run_takes_the_tests_that_run_nowhere_else_first():
    """On a GPU the suite is reordered (tests/conftest.py): the CUDA kernels' tests, then the other
    GPU tests and the Triton backend's (on the GPU there), then what CI runs on the CPU."""
    from types import SimpleNamespace

    from conftest import _gpu_run_priority

    def item(file, backend=None, gpu=False):
        callspec = SimpleNamespace(params={"backend": backend, "dtype": "bf16"}) if backend else None
        return SimpleNamespace(path=Path("tests") / file, keywords={"gpu": True} if gpu else {},
                               callspec=callspec)

    cases = {("test_attention.py", "cuda", False): 0, ("test_cuda_attention.py", None, True): 0,
             ("test_attention.py", "triton", False): 1, ("test_attention.py", "torch", True): 1,
             ("test_optimize.py", None, True): 1, ("test_cuda_backend.py", None, False): 2,
             ("test_attention.py", "torch", False): 2, ("test_dispatch.py", None, False): 2}
    for (file, backend, gpu), priority in cases.items():
        assert _gpu_run_priority(item(file, backend, gpu)) == priority, (file, backend, gpu)


@pytest.mark.parametrize("extra", [[], ["--readme"]])
def test_summarize_names_a_missing_folder(tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as exit_:
        summarize.main([str(tmp_path / "nowhere"), *extra])
    assert exit_.value.code == 2 and "no folder" in capsys.readouterr().err


def test_a_folder_without_steps_claims_no_step_result(tmp_path):
    """Results the benchmark scripts wrote by themselves (no steps.tsv): no step table, no verdict."""
    out = _folder(tmp_path, on_gpu=False)
    (out / "steps.tsv").unlink()
    assert summarize.main([str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert "results of separate runs" in text and "GPU kernels not measured" in text
    for claim in ("GPU check", "steps passed", "| step |", "GPU steps were skipped", "## gelu"):
        assert claim not in text
    assert "## attention" in text
    (out / "steps.tsv").write_text("step\tstatus\tseconds\tnote\n")  # gpu_check.sh cut short at once
    assert summarize.main([str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert "no step recorded" in text and "steps passed" not in text


def _rewrite(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_killed_run_reads_as_partial_and_a_stop_gets_no_invented_reason(tmp_path, capsys):
    """"final": false is a JSON last written mid-run; stopped_early does not record why the run stopped."""
    out = _folder(tmp_path, on_gpu=True)
    _rewrite(out / "attention.json", final=False, stopped_early=True)
    assert summarize.main([str(out)]) == 0
    assert "Partial: the run ended before finishing" in (out / "summary.md").read_text()
    assert summarize.main([str(out), "--readme"]) == 0
    assert "Partial: the run ended before finishing" in capsys.readouterr().out
    _rewrite(out / "attention.json", final=True)
    assert summarize.main([str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert "Partial" not in text and "Stopped early: some shapes were not measured" in text
    assert "time budget)" not in text  # the old "(time budget)": a SIGTERM sets the same flag


def test_a_backward_only_run_gets_its_table(tmp_path):
    """--passes bwd: the section tabulates bwd; the passes not tabulated are named."""
    out = _folder(tmp_path, on_gpu=True)
    rows = json.loads((out / "attention.json").read_text())["rows"]
    _rewrite(out / "attention.json", rows=[r for r in rows if r["pass"] == "bwd"])
    assert summarize.main([str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert "attention, bwd: median ms" in text and "also measured" not in text
    _rewrite(out / "attention.json", rows=rows)
    assert summarize.main([str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert "attention, fwd+bwd: median ms" in text and "attention: also measured fwd, bwd" in text


def test_a_finetune_only_folder_has_its_environment(tmp_path):
    """finetune.json's environment fills the section, and the run's command, date and commit are shown."""
    for suffix in ("json", "md"):
        shutil.copy(BENCH / "results" / f"finetune-quick-cpu.{suffix}", tmp_path / f"finetune.{suffix}")
    env = json.loads((tmp_path / "finetune.json").read_text())["environment"]
    assert summarize.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    environment = text.split("## Environment")[1].split("##")[0]
    assert f"- date: {env['date']}" in environment and f"- git_commit: {env['git_commit']}" in environment
    finetune = text.split("## finetune")[1]
    assert f"`{env['command']}`" in finetune and env["date"] in finetune and env["git_commit"] in finetune
