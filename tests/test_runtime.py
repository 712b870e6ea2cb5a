"""gsae.runtime and the runtime section: device settings resolve as documented, CPU runs are untouched, and the
settings added for scale-out leave the cache keys of existing profiles unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from gsae import pipeline, runtime
from gsae.config import ConfigError, DataConfig, RuntimeConfig, config_hash, load_profile

ROOT = Path(__file__).resolve().parent.parent


def test_device_settings_resolve_as_documented(monkeypatch):
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto", local_rank=3) == torch.device("cpu")  # auto on a CPU machine
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        runtime.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)  # the local rank's GPU
    assert runtime.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert runtime.resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="only 2 CUDA devices"):
        runtime.resolve_device("cuda:2")


def test_bad_runtime_values_are_refused():
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(ConfigError, match="runtime.device"):
            RuntimeConfig(device=bad)
    with pytest.raises(ConfigError, match="timeout_hours"):
        RuntimeConfig(timeout_hours=0)
    assert pipeline.main(["summary", "--profile", "smoke", "--device", "npu"]) == 2


def test_cpu_copies_are_no_ops_and_the_default_resolves_to_cpu_here():
    x = torch.randn(4, 3)
    assert runtime.to_device(x, torch.device("cpu")) is x and runtime.to_device(x, None) is x
    assert runtime.to_device(x, None, torch.float16).dtype == torch.float16
    if not torch.cuda.is_available():
        assert runtime.resolve_device(load_profile("smoke").runtime.device) == torch.device("cpu")
    assert runtime.module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def test_added_settings_keep_existing_cache_keys():
    """Settings added after caches existed (data.documents, data.source, harvest.label_free_splits) are left out of
    config_hash at their defaults, so caches made before keep their directories: the cache keys of the shipped
    profiles are the values recorded with the code of commit 97eacbf."""
    paper = load_profile("paper")
    for name, keys in {"default": ("644c659c78a6", "f869853adeb4", "6e62224b", "185d9168", "e6651d5b"),
                       "smoke": ("6671d4b09818", "134adfeec244", "8ce7f913", "6b32d091", "570e30aa")}.items():
        p = load_profile(name)
        # Study v6 registered eval.full_test_encoders [plain, g] in both profiles: a changed setting, so a new key;
        # at the setting's default the key is the one recorded before the setting existed.
        before = dataclasses.replace(p.eval, full_test_encoders=("plain",))
        assert config_hash(p.eval, "c", n=8) != config_hash(before, "c", n=8)
        assert (config_hash(p.model, p.data, p.harvest, "x"), config_hash(p.data, p.harvest.tokens,
                                                                         p.harvest.exclude_pos0, "m"),
                config_hash(before, "c", n=8), config_hash(p.steering, "c", n=8),
                config_hash(p.probing, "c", n=8)) == keys
    owt = DataConfig(corpus="openwebtext", ctx_len=128)
    assert config_hash(owt) != config_hash(dataclasses.replace(owt, documents=5))
    assert config_hash(owt) != config_hash(dataclasses.replace(owt, source="owt.jsonl"))
    assert paper.data.documents > 0  # the paper profile states its document budget
    with pytest.raises(ConfigError, match="openwebtext"):
        DataConfig(corpus="brown", documents=10)
