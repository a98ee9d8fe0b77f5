"""The harness's two model sizes: the seed's, and one where expert weights stream from HBM.

``seed``: the original harness (d_model 256, 4 layers, 4 experts top-2, experts of d_ff 1024):
every expert is 1.5 MB, so the whole model sits in a Hopper L2 (50-60 MB) and touching fewer
experts saves no HBM traffic. It stays the default, and its dense model is the calibrated table's.

``deployment``: OLMoE-1B-7B's layer (d_model 2048, 64 experts, top-8, experts of d_ff 1024), 4 of
its 16 layers, context 1024. One layer's experts hold 64 x 3 x 2048 x 1024 bf16 values = 805 MB,
13x an H200's 60 MB L2 (the check in ``expert_bytes_per_layer`` reads the device's own L2), so a
decode step streams the experts it touches from HBM and routing decides how many bytes move. The
dense model at the same width (d_ff 4 x 2048 = 8192) runs the same number of FFN weights per token
as the MoE (8 experts x 1024 = 8192): an active-parameter match. Real MoE deployments sit here
(OLMoE, Qwen3-30B-A3B's 128 x top-8 of d_ff 768, DeepSeek-V2-Lite's 64 x top-6 of 1408).

Each preset also names a ladder of dense widths for the iso-quality baseline (the smallest that
reaches the MoE's held-out bits/byte is chosen after training) and the training budget per model.
"""
from dataclasses import asdict, dataclass

from bench.harness.models import model_dims
from costmodel.ops import ModelDims

L2_MULTIPLE_TARGET = 10  # a deployment-scale layer's experts: at least this many L2s


@dataclass(frozen=True)
class Preset:
    name: str
    d_model: int
    num_layers: int
    num_experts: int
    top_k: int
    expert_d_ff: int
    seq_length: int
    batch_size: int  # forward sequences
    decode: tuple
    eval_bytes: int
    dense_ladder: tuple  # dense widths trained for the iso-quality baseline (the first is the trunk)
    train_batch_size: int
    train_steps: int  # at most; the time budget usually ends training first
    train_seconds: float  # per model
    lr: float

    def dense_dims(self, d_model: int | None = None) -> ModelDims:
        return model_dims(d_model or self.d_model, self.seq_length)

    def moe_dims(self) -> ModelDims:
        return model_dims(self.d_model, self.seq_length, self.num_experts, self.top_k, self.expert_d_ff)

    def as_dict(self) -> dict:
        return asdict(self)


SEED = Preset("seed", d_model=256, num_layers=4, num_experts=4, top_k=2, expert_d_ff=1024, seq_length=512,
              batch_size=8, decode=(1, 4, 16, 64), eval_bytes=131072, dense_ladder=(256, 384, 512),
              train_batch_size=32, train_steps=1000, train_seconds=30.0, lr=1e-3)
DEPLOYMENT = Preset("deployment", d_model=2048, num_layers=4, num_experts=64, top_k=8, expert_d_ff=1024,
                    seq_length=1024, batch_size=8, decode=(1, 4, 16, 64), eval_bytes=131072,
                    dense_ladder=(2048, 3072), train_batch_size=16, train_steps=2000, train_seconds=100.0, lr=6e-4)
PRESETS = {p.name: p for p in (SEED, DEPLOYMENT)}


def expert_bytes_per_layer(preset: Preset, bytes_per_value: int = 2) -> int:
    return preset.num_experts * 3 * preset.d_model * preset.expert_d_ff * bytes_per_value


def l2_check(preset: Preset, l2_bytes: int | None) -> dict:
    """How many L2s one layer's experts fill (None without a device to read the L2 from)."""
    if not l2_bytes:
        return {"expert_bytes_per_layer": expert_bytes_per_layer(preset), "l2_bytes": None, "l2_multiple": None,
                "streams_from_hbm": None, "reason": "no CUDA device to read the L2 size from"}
    multiple = expert_bytes_per_layer(preset) / l2_bytes
    return {"expert_bytes_per_layer": expert_bytes_per_layer(preset), "l2_bytes": l2_bytes, "l2_multiple": multiple,
            "streams_from_hbm": multiple >= L2_MULTIPLE_TARGET}
