"""bench.train: the stdlib corpus, its by-file split, held-out evaluation, checkpoints, grouped-GEMM experts,
the time budget, and a tiny run."""
import math

import pytest
import torch

from bench.harness.models import TransformerLM, model_dims
from bench.harness.corpus import (HELDOUT_PERCENT, checkpoint_path, corpus_files, evaluate, heldout_streams,
                                  load_checkpoint, save_checkpoint, split_by_file, stdlib_root)
from bench.harness.models import grouped_mm_experts
from bench.harness.training import TrainConfig, budgeted_steps
from bench.train import main, parse_args
from kernels.fused_experts import fused_experts_reference
from tests.conftest import rel_error
from tests.conftest import DEVICE


@pytest.fixture(scope="module")
def stdlib_files():
    return corpus_files(stdlib_root())


def test_split_is_by_file_disjoint_and_deterministic(stdlib_files):
    train, heldout = split_by_file(stdlib_files)
    assert set(train).isdisjoint(heldout) and sorted(train + heldout) == stdlib_files
    reversed_train, reversed_heldout = split_by_file(stdlib_files[::-1])  # by path alone, not by position
    assert (reversed_train[::-1], reversed_heldout[::-1]) == (train, heldout) == split_by_file(stdlib_files)
    share = 100 * len(heldout) / len(stdlib_files)
    assert HELDOUT_PERCENT / 2 < share < HELDOUT_PERCENT * 2  # a hash split: about 5% of the files
    assert not any("site-packages" in p or "dist-packages" in p for p in stdlib_files)


def test_corpus_leaves_installed_packages_out(tmp_path):
    for path in ("a.py", "pkg/b.py", "site-packages/c.py", "pkg/dist-packages/d.py", "notes.txt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x = 1\n")
    assert corpus_files(tmp_path) == ["a.py", "pkg/b.py"]


def test_heldout_streams_are_the_longest_files_within_budget(tmp_path):
    names = [f"f{i}.py" for i in range(400)]  # enough files that some are held out
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(bytes([65 + i % 26]) * (10 + i))
    _, heldout = split_by_file(names)
    streams = heldout_streams(tmp_path, heldout, budget_bytes=1000)
    assert 0 < sum(len(s) for s in streams) <= 1000
    assert [len(s) for s in streams[:-1]] == sorted((len(s) for s in streams[:-1]), reverse=True)


def test_evaluate_counts_every_predicted_byte():
    streams = [torch.arange(100, dtype=torch.uint8), torch.arange(7, dtype=torch.uint8)]
    uniform = evaluate(lambda tokens: torch.zeros(*tokens.shape, 256), streams, seq_length=16, device="cpu")
    assert uniform["bytes"] == 99 + 6 and uniform["files"] == 2
    assert math.isclose(uniform["bits_per_byte"], 8.0, rel_tol=1e-6)  # float32 cross-entropy of log(256)
    assert math.isclose(uniform["perplexity"], 256.0, rel_tol=1e-5)


def test_checkpoints_round_trip(tmp_path):
    dims = model_dims(32, 16)
    model = TransformerLM(dims, 1, moe=True, use_kernels=False, seed=3)
    path = checkpoint_path(tmp_path / "ck", True, 32, 1, dims.num_experts, dims.top_k)
    save_checkpoint(path, model, {"steps": 1, "version": torch.__version__})
    restored = TransformerLM(dims, 1, moe=True, use_kernels=False, seed=4)
    assert load_checkpoint(path, restored)["steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_tiny_training_run(tmp_path, capsys):
    main(["--steps", "2", "--d_model", "32", "--num_layers", "1", "--seq_length", "16", "--batch_size", "2",
          "--eval_bytes", "64", "--output_dir", str(tmp_path), "--device", DEVICE, "--time_budget_s", "1e-9"])
    for moe in (False, True):
        path = checkpoint_path(tmp_path, moe, 32, 1, 4, 2)
        meta = torch.load(path, weights_only=True)["meta"]
        assert meta["steps"] == 2 and meta["heldout"]["bytes"] > 0 and meta["heldout"]["bits_per_byte"] > 0
        assert meta["corpus"]["heldout_files"] > 0 and meta["parameters"]["total"] > 0
    out = capsys.readouterr().out
    assert "held-out" in out and "trained past --time_budget_s 1e-09 s" in out, "an overrun budget is said"


@pytest.mark.parametrize("flags, named", [
    (["--steps", "0"], "--steps"),
    (["--num_experts", "2", "--top_k", "3"], "--top_k"),
    (["--models", "dense,sparse"], "--models"),
    (["--d_model", "40"], "--d_model"),
    (["--lr", "-1"], "--lr"),
    (["--time_budget_s", "0"], "--time_budget_s"),
    (["--preset", "deployment", "--num_experts", "8"], "--num_experts"),
    (["--output_dir", __file__], "--output_dir"),
    (["--device", "tpu"], "--device"),
    (["--aux_loss_coef", "nan"], "--aux_loss_coef"),
    (["--aux_loss_coef", "-5"], "--aux_loss_coef: must be a finite number >= 0"),
    (["--lr", "1e300"], "--lr: must be a finite AdamW learning rate in (0, 1]"),
    (["--lr", "nan"], "--lr"),
    (["--eval_bytes", "1"], "--eval_bytes: must be >= 2"),
    (["--models", "dense,dense"], "--models: repeats dense"),
    (["--models", ""], "--models"),
], ids=["steps", "top_k", "models", "d_model", "lr", "budget", "preset-conflict", "output-file", "device", "aux-nan",
        "aux-negative", "lr-huge", "lr-nan", "eval-bytes", "models-repeated", "models-empty"])
def test_bad_flags_name_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize("T, E, K", [(7, 4, 2), (1, 3, 3), (0, 2, 1), (9, 5, 1)], ids=["odd", "k=e", "empty", "k1"])
def test_grouped_mm_experts_match_the_per_expert_loop_with_gradients(T, E, K):
    H, I = 16, 8
    x = torch.randn(T, H, dtype=torch.float64).float().requires_grad_()
    gate_up = (torch.randn(E, 2 * I, H) * H ** -0.5).requires_grad_()
    down = (torch.randn(E, H, I) * I ** -0.5).requires_grad_()
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    weights = torch.rand(T, K).requires_grad_()
    ours = grouped_mm_experts(x, gate_up, down, ids, weights)
    ref = fused_experts_reference(x, gate_up, down, ids, weights)
    assert ours.shape == (T, H) and rel_error(ours, ref) <= 1e-5
    if T:
        grad = torch.randn_like(ours)
        got = torch.autograd.grad(ours, (x, gate_up, down, weights), grad)
        want = torch.autograd.grad(ref, (x, gate_up, down, weights), grad)
        assert all(rel_error(a, b) <= 1e-5 for a, b in zip(got, want))


def test_time_budget_sets_the_steps():
    config = TrainConfig(max_steps=1000, batch_size=2, lr=1e-3, time_budget_s=10.0)
    assert budgeted_steps(config, step_s=0.1) == 100 and budgeted_steps(config, step_s=1e-4) == 1000
    assert budgeted_steps(TrainConfig(max_steps=30, batch_size=2, lr=1e-3), step_s=5.0) == 30
