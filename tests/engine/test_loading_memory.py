"""No second copy of the experts: structure of a loaded model, and peak RSS of a real load.

The structural checks are exact: the model's experts modules own no tensors, the model's
parameters are exactly the checkpoint's trunk, and the host store holds one buffer per MoE
layer. The RSS check loads a ~165 MB checkpoint in a fresh process and compares the peak
resident-set growth with the checkpoint size: a second full copy of the experts (or keeping
the whole mmap resident) would exceed the bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

from engine.config import LoadConfig
from engine.offload.experts import OffloadedExperts
from engine.offload.store import REMAP_BYTES
from engine.runtime.loading import load_model
from tests.helpers.moe_families import save_family
from tests.helpers.tiny_models import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MEASURE = """
import json, sys
from engine.config import CacheConfig, LoadConfig
from engine.runtime.loading import inspect_model, load_model

def status(field):  # VmHWM, unlike ru_maxrss, is not inherited from the forking parent
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0

def rss():
    return status("VmRSS")

inspect_model(sys.argv[1])  # imports the modeling code first: not part of the load's cost
before = status("VmHWM")
loaded = load_model(LoadConfig(sys.argv[1], cache=CacheConfig(fraction=0.25)))
peak = status("VmHWM")
print(json.dumps({"before": before, "after": rss(), "peak": peak,
                  "store": loaded.offload.store.nbytes}))
"""


def test_offloaded_model_holds_no_expert_weights(tmp_path: Path) -> None:
    save_family("qwen2_moe", tmp_path / "m")
    loaded = load_model(LoadConfig(tmp_path / "m", dtype="float32"))
    experts = [m for m in loaded.model.modules() if isinstance(m, OffloadedExperts)]
    assert len(experts) == loaded.info.moe_layers
    for module in experts:
        assert list(module.parameters()) == [] and list(module.buffers()) == []
    params = {p.data_ptr(): p.numel() * p.element_size() for p in loaded.model.parameters()}
    assert sum(params.values()) == loaded.info.trunk_bytes  # fp32 checkpoint loaded in fp32
    store = loaded.offload.store
    buffers = store.buffers()
    assert len(buffers) == loaded.info.moe_layers
    assert all(b.shape == (loaded.info.experts_per_layer, store.shape.numel) for b in buffers)
    assert store.nbytes >= loaded.info.total_expert_bytes  # only alignment padding on top
    assert store.nbytes < loaded.info.total_expert_bytes * 1.1


def test_close_frees_slots_and_host_buffers(tmp_path: Path) -> None:
    save_family("olmoe", tmp_path / "m")
    loaded = load_model(LoadConfig(tmp_path / "m"))
    loaded.offload.close()
    assert loaded.offload.store.nbytes == 0
    assert loaded.offload.cache.nbytes == 0


def _save_medium_model(directory: Path) -> int:
    tokenizer = build_tiny_tokenizer()
    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=384, intermediate_size=512,
        moe_intermediate_size=512, shared_expert_intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return (directory / "model.safetensors").stat().st_size


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_host_memory_of_a_load_stays_near_the_checkpoint(tmp_path: Path) -> None:
    checkpoint = _save_medium_model(tmp_path / "m")
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "m")],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["before"]
    # experts + trunk, plus at most one mapped read window and allocator slack
    assert growth < checkpoint + REMAP_BYTES + 48 * 2**20, measured
    assert measured["store"] > 0.8 * checkpoint
