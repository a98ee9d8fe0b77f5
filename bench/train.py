"""``python -m bench.train``: byte-level LMs trained on the Python standard library's own source.

The corpus is on every machine with no download: the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (installed packages in ``site-packages``/``dist-packages``
left out). The held-out split is by file: a file is held out when the SHA-256 of its path
relative to the stdlib root falls in the lowest ``HELDOUT_PERCENT`` of hash values, so the split
is the same on every run and every machine with the same stdlib, and no held-out byte is ever
trained on. Training samples random windows from the concatenated training files; evaluation
(``evaluate``) reads the longest held-out files front to back in windows of ``seq_length``
(each window its own context), so a model that adapts at test time sees each file in order.

It trains the dense and the MoE ``TransformerLM`` (``bench.models``) on the torch reference ops
(the weights are the same for the kernels; the references' autograd is one forward, the kernels'
recomputes the reference in backward), with AdamW, a warmup-then-cosine schedule, bf16 autocast
on a GPU, and for the MoE a switch-style load-balancing loss (without one, the routers starve
experts). Checkpoints go to ``--output_dir`` (default ``checkpoints/``, outside git) atomically,
named by their dims (``checkpoint_path``), with their config, corpus statistics, held-out
bits per byte and perplexity, and provenance.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the MoE routing kernel; before triton is imported

from bench._results import provenance  # noqa: E402
from bench.models import TransformerLM, model_dims  # noqa: E402

HELDOUT_PERCENT = 5
EXCLUDED_DIRS = frozenset(("site-packages", "dist-packages"))  # installed packages, not the stdlib
LOG_EVERY = 50


def stdlib_root():
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root):
    """The corpus: relative POSIX paths of the ``.py`` files under ``root``, sorted."""
    root = Path(root)
    paths = (p.relative_to(root) for p in root.rglob("*.py") if p.is_file())
    return sorted(p.as_posix() for p in paths if not EXCLUDED_DIRS & set(p.parts))


def is_heldout(relative_path):
    """Deterministic by-file split: the path's SHA-256, as a number, in the lowest HELDOUT_PERCENT."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def split_by_file(relative_paths):
    """(train, held-out) lists of relative paths."""
    heldout = [p for p in relative_paths if is_heldout(p)]
    return [p for p in relative_paths if not is_heldout(p)], heldout


def read_stream(root, relative_paths):
    """The files' bytes, concatenated, as a uint8 tensor."""
    data = b"".join((Path(root) / p).read_bytes() for p in relative_paths)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def heldout_streams(root, heldout, budget_bytes, min_bytes=2):
    """The longest ``heldout`` files (each a uint8 tensor), front parts kept, up to ``budget_bytes`` in all."""
    streams = []
    for path in sorted(heldout, key=lambda p: (-(Path(root) / p).stat().st_size, p)):
        left = budget_bytes - sum(len(s) for s in streams)
        if left < min_bytes:
            break
        stream = read_stream(root, [path])[:left]
        if len(stream) >= min_bytes:
            streams.append(stream)
    return streams


def corpus_summary(root, train, heldout):
    listing = hashlib.sha256("\n".join(train + ["--"] + heldout).encode()).hexdigest()[:16]
    return {"root": str(root), "python": sys.version.split()[0], "train_files": len(train),
            "heldout_files": len(heldout), "heldout_percent": HELDOUT_PERCENT, "file_list_sha256_16": listing}


@torch.no_grad()
def evaluate(model, streams, seq_length, device):
    """Held-out bits per byte and perplexity: each stream front to back in windows of
    ``seq_length`` predictions, one window per forward (in order, so test-time training is causal)."""
    nats, predicted = 0.0, 0
    for stream in streams:
        stream = stream.to(device=device, dtype=torch.long)
        for start in range(0, len(stream) - 1, seq_length):
            window = stream[start:start + seq_length + 1][None]  # [1, S + 1]
            logits = model(window[:, :-1])
            nats += F.cross_entropy(logits.float()[0], window[0, 1:], reduction="sum").item()
            predicted += window.shape[1] - 1
    if predicted == 0:
        return {"bits_per_byte": None, "perplexity": None, "bytes": 0, "files": len(streams),
                "reason": "no held-out bytes"}
    bits = nats / predicted / math.log(2)
    return {"bits_per_byte": bits, "perplexity": 2.0 ** bits, "bytes": predicted, "files": len(streams)}


def checkpoint_path(directory, moe, d_model, num_layers, num_experts, top_k):
    name = f"moe_d{d_model}_L{num_layers}_E{num_experts}k{top_k}" if moe else f"dense_d{d_model}_L{num_layers}"
    return Path(directory) / f"{name}.pt"


def save_checkpoint(path, model, meta):
    """``torch.save`` through a temp file and rename: a crash leaves the old checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        plain_meta = json.loads(json.dumps(meta))  # plain JSON types: weights_only loading refuses others
        torch.save({"meta": plain_meta, "state_dict": state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path, model):
    """Load ``path``'s weights into ``model`` (its dims must match); the checkpoint's meta."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    return checkpoint["meta"]


def balance_loss_hooks(lm, losses):
    """Forward hooks on every router that append a switch-style load-balancing loss to ``losses``:
    E * sum_e (share of routed slots on e) * (mean router probability of e); 1 when balanced."""
    def hook(router, inputs, output):
        logits, _, ids = output
        E = logits.shape[-1]
        ones = torch.ones(ids.numel(), device=ids.device)
        share = torch.zeros(E, device=ids.device).index_add_(0, ids.reshape(-1).long(), ones) / ids.numel()
        losses.append(E * (share * logits.float().softmax(-1).mean(0)).sum())
    return [block.moe.gate.register_forward_hook(hook) for block in lm.blocks]


def learning_rate(step, steps, peak_lr):
    """Linear warmup over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak_lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def random_batch(stream, batch_size, seq_length, generator, device):
    starts = torch.randint(0, len(stream) - seq_length - 1, (batch_size,), generator=generator)
    rows = torch.stack([stream[s:s + seq_length + 1] for s in starts.tolist()]).to(device, torch.long)
    return rows[:, :-1], rows[:, 1:]


def train_model(args, moe, train_stream, device):
    """Train one model; (model, meta)."""
    dims = model_dims(args.d_model, args.seq_length, args.num_experts, args.top_k)
    model = TransformerLM(dims, args.num_layers, moe=moe, use_kernels=False, device=device, seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    balance = []
    hooks = balance_loss_hooks(model, balance) if moe else []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0, loss_value = time.monotonic(), None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        inputs, targets = random_batch(train_stream, args.batch_size, args.seq_length, generator, device)
        balance.clear()
        with autocast:
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        total = loss + args.aux_loss_coef * torch.stack(balance).mean() if balance else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % LOG_EVERY == 0 or step == args.steps - 1:
            loss_value = loss.item()
            print(f"{'moe' if moe else 'dense'} step {step + 1}/{args.steps}: loss {loss_value:.3f} nats/byte, "
                  f"{time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    for hook in hooks:
        hook.remove()
    meta = {"dims": asdict(dims), "num_layers": args.num_layers, "moe": moe, "seed": args.seed, "steps": args.steps,
            "batch_size": args.batch_size, "seq_length": args.seq_length, "lr": args.lr,
            "aux_loss_coef": args.aux_loss_coef if moe else None, "train_seconds": time.monotonic() - t0,
            "final_train_loss_nats_per_byte": loss_value, "parameters": model.parameter_counts()}
    return model, meta


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


MOE_CPU_NEEDS_INTERPRETER = ("an MoE on --device cpu needs TRITON_INTERPRET=1 on a machine with CUDA: the routing "
                             "kernel takes CPU tensors only under Triton's interpreter")


def moe_cpu_without_interpreter(device):
    """Would an MoE on ``device`` launch the routing kernel on CPU tensors without the interpreter?"""
    return device.type == "cpu" and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def resolve_device(parser, name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {name}: no CUDA device here (torch.cuda.is_available() is False)")
    return torch.device(name)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--d_model", type=positive_int, default=256)
    parser.add_argument("--num_layers", type=positive_int, default=4)
    parser.add_argument("--num_experts", type=positive_int, default=4)
    parser.add_argument("--top_k", type=positive_int, default=2)
    parser.add_argument("--seq_length", type=positive_int, default=512)
    parser.add_argument("--steps", type=positive_int, default=1000)
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--aux_loss_coef", type=float, default=0.01, help="MoE load-balancing loss weight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="dense,moe", help="comma-separated: dense, moe")
    parser.add_argument("--eval_bytes", type=positive_int, default=None,
                        help="held-out bytes to evaluate (default: 131072 on a GPU, 4096 on a CPU)")
    parser.add_argument("--output_dir", default="checkpoints")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.top_k > args.num_experts:
        parser.error(f"--top_k ({args.top_k}) must be <= --num_experts ({args.num_experts})")
    if args.d_model % 32:
        parser.error(f"--d_model must be a multiple of 32 (attention heads of 32 or 64), got {args.d_model}")
    args.models = args.models.split(",")
    if not args.models or set(args.models) - {"dense", "moe"}:
        parser.error(f"--models must be a comma-separated subset of dense,moe, got {','.join(args.models)!r}")
    args.device = resolve_device(parser, args.device)
    if "moe" in args.models and moe_cpu_without_interpreter(args.device):
        parser.error(f"--models moe: {MOE_CPU_NEEDS_INTERPRETER}")
    if args.eval_bytes is None:
        args.eval_bytes = 131072 if args.device.type == "cuda" else 4096
    return args


def main(argv=None):
    args = parse_args(argv)
    root = stdlib_root()
    train, heldout = split_by_file(corpus_files(root))
    train_stream = read_stream(root, train)
    if len(train_stream) <= args.seq_length + 1:
        raise SystemExit(f"the training corpus under {root} has only {len(train_stream)} bytes")
    streams = heldout_streams(root, heldout, args.eval_bytes)
    corpus = corpus_summary(root, train, heldout) | {"train_bytes": len(train_stream)}
    print(f"corpus: {corpus['train_files']} training files ({len(train_stream) / 1e6:.1f} MB), "
          f"{corpus['heldout_files']} held out (by file); evaluating {sum(len(s) for s in streams)} held-out bytes",
          flush=True)
    for kind in args.models:
        model, meta = train_model(args, kind == "moe", train_stream, args.device)
        model.eval()
        heldout_metrics = evaluate(model, streams, args.seq_length, args.device)
        path = checkpoint_path(args.output_dir, kind == "moe", args.d_model, args.num_layers, args.num_experts,
                               args.top_k)
        save_checkpoint(path, model, meta | {"corpus": corpus, "heldout": heldout_metrics,
                                             "provenance": provenance()})
        print(f"{kind}: held-out {heldout_metrics['bits_per_byte']:.3f} bits/byte (perplexity "
              f"{heldout_metrics['perplexity']:.2f} per byte) over {heldout_metrics['bytes']} bytes, "
              f"{meta['train_seconds']:.0f} s training; wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
