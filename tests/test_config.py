"""Per-GPU block-size config files and their lookup."""
import json
import re

import pytest
import torch

from kernels import config as _config
from kernels.routing import launch_config

ROUTING_OPS = ("topk_routing", "policy_routing")

CONFIG_FILES = sorted(_config.CONFIG_DIR.glob("*/*.json"))


def test_select_config_takes_first_matching_entry():
    entries = [{"when": {"max_m": 64}, "config": "small"}, {"when": {"max_k": 256}, "config": "thin"},
               {"config": "big"}]
    assert _config.select_config(entries, m=64, k=4096) == "small"
    assert _config.select_config(entries, m=65, k=256) == "thin"
    assert _config.select_config(entries, m=4096, k=4096) == "big"


def test_select_config_min_and_max_bounds_pin_a_shape():
    entries = [{"when": {"min_e": 8, "max_e": 8, "max_slots_per_expert": 16}, "config": "mixtral-decode"},
               {"config": "other"}]
    assert _config.select_config(entries, e=8, slots_per_expert=2) == "mixtral-decode"
    assert _config.select_config(entries, e=64, slots_per_expert=2) == "other"
    assert _config.select_config(entries, e=8, slots_per_expert=17) == "other"


def test_select_config_without_fallback_raises():
    with pytest.raises(ValueError, match="no config entry"):
        _config.select_config([{"when": {"max_m": 1}, "config": {}}], m=2)


def test_unknown_gpu_falls_back_to_default():
    entries, path = _config.load_entries("matmul", "Some Future GPU 9000")
    assert path.name == "default.json" and entries


def test_file_stem():
    assert _config.config_file_stem("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[f"{p.parent.name}/{p.name}" for p in CONFIG_FILES])
def test_config_file_is_well_formed(path):
    entries = json.loads(path.read_text())["entries"]
    assert "when" not in entries[-1], "the last entry must be the unconditional fallback"
    for entry in entries:
        cfg = entry["config"]
        if path.parent.name in ROUTING_OPS:  # one program per block of tokens: its size and warps only
            assert launch_config(path.parent.name, 1, 8, "cpu", cfg) == (1, cfg["num_warps"])
            assert cfg["block_t"] & (cfg["block_t"] - 1) == 0, f"block_t={cfg['block_t']} is not a power of two"
            continue
        for key, value in cfg.items():
            if key.startswith("block_"):
                assert value >= 16 and value & (value - 1) == 0, f"{key}={value} is not a power of two >= 16"
        assert cfg["num_warps"] in (1, 2, 4, 8, 16) and cfg["num_stages"] >= 1

def test_a_gpu_without_its_own_file_takes_a_tuned_file_of_its_architecture():
    entries, path = _config.load_entries("matmul", "NVIDIA H200", "9.0")
    assert path.name == "NVIDIA_H100_80GB_HBM3.json", "the H200 (sm_90) reads the H100's tuned configs"
    assert json.loads(path.read_text())["compute_capability"] == "9.0"
    _, path = _config.load_entries("topk_routing", "NVIDIA H100 80GB HBM3", "9.0")
    assert path.name == "NVIDIA_H200.json"
    _, own = _config.load_entries("matmul", "NVIDIA H100 80GB HBM3", "9.0")
    assert own.name == "NVIDIA_H100_80GB_HBM3.json", "a GPU's own file first"
    _, other = _config.load_entries("matmul", "NVIDIA A100-SXM4-80GB", "8.0")
    assert other.name == "default.json", "no tuned file of its architecture: the default"


def test_every_tuned_file_names_its_compute_capability():
    for path in CONFIG_FILES:
        if path.name != "default.json":
            assert re.fullmatch(r"\d+\.\d+", json.loads(path.read_text())["compute_capability"]), path


BAD_LOOKUPS = [  # (what is wrong, lookup arguments, the phrase its ValueError holds)
    ("unknown op", ("nope", "cpu"), "op 'nope' has no block configs; expected one of attention"),
    ("op outside configs", ("../matmul", "cpu"), "op '../matmul' has no block configs"),
    ("device string", ("matmul", "gpu"), "device must be a torch.device, a device string or a CUDA index, got 'gpu'"),
    ("device None", ("matmul", None), "device must be .* got None"),
    ("missing dims", ("matmul", "cpu"), "a config entry bounds 'm', which the lookup's dims \\[\\] lack"),
]


@pytest.mark.parametrize("what, args, phrase", BAD_LOOKUPS, ids=[w for w, _, _ in BAD_LOOKUPS])
def test_bad_lookup_is_named(what, args, phrase):
    with pytest.raises(ValueError, match=phrase):
        _config.lookup(*args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a CUDA device where there is none")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_device_without_cuda_is_named(device):
    with pytest.raises(ValueError, match=f"device is {device} but no CUDA device is available"):
        _config.config_sources(device)


def test_config_sources_name_the_file_each_op_reads():
    sources = _config.config_sources("cpu")
    assert set(sources) == {p.name for p in _config.CONFIG_DIR.iterdir() if p.is_dir()}
    assert set(sources.values()) == {"default.json"}, "a CPU reads the defaults"
