"""Expert parallelism: the dispatch plan by hand, and the layer on several processes against the
single-process layer: gloo on the CPU (in CI), NCCL on 2 and 4 GPUs where they exist."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kernels
from kernels.expert_parallel import expert_parallel_experts, plan_dispatch
from kernels.fused_experts import fused_experts_reference
from tests.conftest import DEVICE, ON_GPU, REL_TOL, rel_error

# the gloo runs import triton afresh in each process in interpreter mode, which is the CPU
# machines' mode (CI); on a CUDA machine the NCCL tests run the layer for real
cpu_machine_only = pytest.mark.skipif(ON_GPU, reason="the gloo/interpreter run is the CPU machines' test; "
                                      "on a CUDA machine test_nccl_layer_matches_single_gpu_in_bf16 covers the layer")


def test_plan_by_hand():
    # 2 ranks x 2 experts: token 0 needs both ranks, token 1 rank 1 only, token 2 rank 0 only
    ids = torch.tensor([[0, 3], [2, 3], [1, 0]], device=DEVICE)
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.9, 0.1]], device=DEVICE)
    plan = plan_dispatch(ids, weights, experts_per_rank=2, world_size=2)
    assert plan.send_counts.tolist() == [2, 2]  # rows for each rank
    assert plan.send_order[:4].tolist() == [0, 2, 3, 4]  # (rank 0: tokens 0, 2), (rank 1: tokens 0, 1)
    assert plan.combine_index.tolist() == [[0, 2], [-1, 3], [1, -1]]
    meta = plan.meta.view(2, 3, 4)
    assert meta[0, 0, :2].tolist() == [0, 2] and meta[1, 0, :2].tolist() == [2, 1]  # 2 = not this rank's
    assert meta[1, 1, :2].tolist() == [0, 1] and meta[0, 2, :2].tolist() == [1, 0]
    assert torch.equal(meta[1, 0, 2:].contiguous().view(torch.float32), weights[0])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(E, H, I):
    gen = torch.Generator().manual_seed(1234)  # every rank builds the same full model
    router = torch.randn(E, H, generator=gen)
    gate_up = torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5
    down = torch.randn(E, H, I, generator=gen) * I ** -0.5
    return router, gate_up, down


def _tokens(rank, H, tokens_per_rank):
    return torch.randn(tokens_per_rank[rank], H, generator=torch.Generator().manual_seed(100 + rank))


def _init(rank, world_size, port, backend):
    """Join the group; a spawned process inherits TRITON_INTERPRET from the parent's environment
    (conftest sets it on CPU machines) when it re-imports this module and triton with it."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    return (torch.device("cuda", rank), torch.bfloat16) if backend == "nccl" else (torch.device("cpu"), torch.float32)


def _rank_checks(rank, world_size, port, E, K, tokens_per_rank, backend="gloo", H=24, I=20, chunks=1, capacity=None,
                 own_apart_from=None):
    device, dtype = _init(rank, world_size, port, backend)
    if own_apart_from is not None:  # this process's copy of the module: the other tests keep the default
        kernels.expert_parallel.OWN_APART_MIN_RANKS = own_apart_from
    try:
        router_weight, gate_up, down = (w.to(device, dtype) for w in _weights(E, H, I))
        x = _tokens(rank, H, tokens_per_rank).to(device, dtype)
        whole = kernels.FusedMoE(kernels.TopKRouter(router_weight, K), gate_up, down)
        per_rank = E // world_size
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        sharded = kernels.FusedMoE(kernels.TopKRouter(router_weight, K), gate_up[mine].clone(), down[mine].clone(),
                                   process_group=dist.group.WORLD, ep_chunks=chunks, ep_capacity=capacity)
        with torch.no_grad():
            expected = whole(x)
            ours = sharded(x)
            _, weights, ids = sharded.gate(x)
            ref_path = expert_parallel_experts(x, ids, weights, gate_up[mine], down[mine], dist.group.WORLD,
                                               experts_fn=fused_experts_reference, chunks=chunks, capacity=capacity)
        for name, out in (("kernels", ours), ("torch reference", ref_path)):
            assert out.shape == expected.shape and torch.isfinite(out).all(), name
            error = rel_error(out, expected)
            assert error <= REL_TOL[dtype], f"rank {rank} ({name}): relative error {error:.3e}"
        with pytest.raises(RuntimeError, match="forward-only"):
            sharded(x)  # gradients enabled: refused, never silently detached
        if capacity is not None:
            with torch.no_grad(), pytest.raises(ValueError, match="ep_capacity"):
                sharded(torch.randn(capacity + 1, H, device=device, dtype=dtype))
            if backend == "nccl":
                _check_graph_replay(sharded, whole, x)
        with pytest.raises(ValueError, match="gate_up_proj"):
            kernels.FusedMoE(kernels.TopKRouter(router_weight, K), gate_up, down, process_group=dist.group.WORLD)
        with pytest.raises(ValueError, match="does not divide"):
            kernels.FusedMoE(kernels.TopKRouter(router_weight[:E - 1], K), gate_up[mine], down[mine],
                             process_group=dist.group.WORLD)
        dist.barrier()  # no rank tears gloo down while another still talks (SIGABRT at exit otherwise)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size, E, K, tokens_per_rank, chunks, capacity", [
    (2, 4, 2, (37, 5), 1, None),
    (2, 6, 3, (0, 11), 3, None),  # a rank with no tokens still joins every collective; more chunks than tokens
    (3, 6, 2, (4, 9, 1), 2, None),  # a world size that is not a power of two
    (2, 4, 2, (37, 5), 1, 40),  # fixed-size exchange: mostly padding on rank 1
    (3, 6, 2, (4, 9, 0), 2, 9),  # a rank at capacity, an empty one, 2 chunks
    (2, 4, 3, (2, 1), 3, 2),  # more chunks than capacity rows
    (4, 8, 3, (5, 0, 9, 2), 1, 9),  # 4 ranks: own tokens run apart, one rank empty
], ids=["W2-E4-K2", "W2-E6-K3-empty-rank-3-chunks", "W3-E6-K2-2-chunks",
        "W2-capacity40", "W3-capacity9-full-and-empty-ranks-2-chunks", "W2-capacity2-3-chunks", "W4-capacity9-own-apart"])
@cpu_machine_only
def test_gloo_layer_matches_single_process(world_size, E, K, tokens_per_rank, chunks, capacity):
    mp.spawn(_rank_checks, args=(world_size, _free_port(), E, K, tokens_per_rank, "gloo", 24, 20, chunks, capacity),
             nprocs=world_size)


@pytest.mark.parametrize("capacity, chunks", [(40, 1), (23, 3)], ids=["one-chunk", "odd-capacity-3-chunks"])
@cpu_machine_only
def test_gloo_own_tokens_apart_on_2_ranks(capacity, chunks):
    """The own-tokens-apart schedule (the default from 4 ranks) forced on 2 ranks, with an odd split."""
    mp.spawn(_rank_checks, args=(2, _free_port(), 4, 2, (23, 6), "gloo", 24, 20, chunks, capacity, 2), nprocs=2)


def _check_graph_replay(sharded, whole, x):
    """The fixed-size exchange captured in a CUDA graph (NCCL collectives included), replayed on
    new tokens, matches the single-GPU layer."""
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        sharded(static_x)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = sharded(static_x)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    with torch.no_grad():
        error = rel_error(static_out, whole(static_x))
    assert error <= REL_TOL[x.dtype], f"graph replay: relative error {error:.3e}"


@pytest.mark.parametrize("world_size", [2, 4])
def test_nccl_layer_matches_single_gpu_in_bf16(world_size):
    """The Qwen3-MoE expert layout (128 experts, top-8) at a small width, on real GPUs: exact and
    fixed-size exchanges, the latter also replayed from a CUDA graph."""
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} CUDA devices, found {torch.cuda.device_count()}")
    tokens = tuple(257 + 64 * r for r in range(world_size))
    for chunks, capacity in ((1, None), (4, None), (1, max(tokens)), (2, max(tokens) + 5)):
        mp.spawn(_rank_checks, args=(world_size, _free_port(), 128, 8, tokens, "nccl", 256, 96, chunks, capacity),
                 nprocs=world_size)


def _rank_from_hf(rank, world_size, port):
    _init(rank, world_size, port, "gloo")
    try:
        import transformers
        torch.manual_seed(0)
        config = transformers.MixtralConfig(hidden_size=32, intermediate_size=40, num_local_experts=4,
                                            num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=1, vocab_size=64)
        block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config)
        with torch.no_grad():
            for p in block.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
        sharded = kernels.FusedMoE.from_hf(block, process_group=dist.group.WORLD)
        assert sharded.experts.gate_up_proj.shape[0] == 2
        assert torch.equal(sharded.experts.down_proj, block.experts.down_proj[2 * rank:2 * rank + 2])
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            expected = block(x)
            expected = expected[0] if isinstance(expected, tuple) else expected
            out = sharded(x)
        out = out[0] if isinstance(out, tuple) else out
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
        dist.barrier()  # no rank tears gloo down while another still talks (SIGABRT at exit otherwise)
    finally:
        dist.destroy_process_group()


@cpu_machine_only
def test_from_hf_shards_a_block():
    pytest.importorskip("transformers", reason="transformers is not installed here")
    mp.spawn(_rank_from_hf, args=(2, _free_port()), nprocs=2)


def test_bad_expert_parallel_arguments():
    router_weight, gate_up, down = _weights(4, 8, 6)
    with pytest.raises(TypeError, match="process_group"):
        kernels.FusedMoE(kernels.TopKRouter(router_weight, 2), gate_up, down, process_group="nccl")
    for chunks in (0, 1.5, True):
        with pytest.raises(ValueError, match="ep_chunks"):
            kernels.FusedMoE(kernels.TopKRouter(router_weight, 2), gate_up, down, ep_chunks=chunks)
    for capacity in (0, 2.0, True, "8"):
        with pytest.raises(ValueError, match="ep_capacity"):
            kernels.FusedMoE(kernels.TopKRouter(router_weight, 2), gate_up, down, ep_capacity=capacity)
