"""GPU detection (env, NVML, declared) and the worker-side view of the ids a task holds."""

from __future__ import annotations

import sys
import types

import pytest

from latticaray.runtime import gpus


def no_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails


def fake_nvml(monkeypatch, names):
    mod = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(names),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: names[h].encode(),
    )
    monkeypatch.setitem(sys.modules, "pynvml", mod)


def test_visible_devices_win_and_are_parsed(monkeypatch):
    fake_nvml(monkeypatch, ["A100", "A100", "A100"])
    info = gpus.detect_gpus(env={"CUDA_VISIBLE_DEVICES": "2, 5"})
    assert info.ids == ("2", "5") and info.source == "env"
    assert gpus.detect_gpus(env={"CUDA_VISIBLE_DEVICES": ""}).ids == ()
    with pytest.raises(ValueError, match="twice"):
        gpus.detect_gpus(env={"CUDA_VISIBLE_DEVICES": "1,1"})


def test_nvml_when_no_env(monkeypatch):
    fake_nvml(monkeypatch, ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])
    info = gpus.detect_gpus(env={})
    assert info.ids == ("0", "1") and info.source == "nvml"
    assert info.labels() == {"accelerator_type": "NVIDIA_H100_80GB_HBM3"}
    assert gpus.detect_gpus(1, env={}).ids == ("0",)


def test_declared_gpus_without_any_device(monkeypatch):
    no_nvml(monkeypatch)
    assert gpus.detect_gpus(env={}).ids == ()
    info = gpus.detect_gpus(3, env={})
    assert info.ids == ("0", "1", "2") and info.source == "declared"
    assert gpus.detect_gpus(3, env={"CUDA_VISIBLE_DEVICES": "4"}).ids == ("4", "0", "1")
    with pytest.raises(ValueError):
        gpus.detect_gpus(1.5, env={})


def test_apply_and_get_gpu_ids():
    env: dict[str, str] = {}
    gpus.apply_gpu_ids(["3"], env)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and gpus.get_gpu_ids() == ["3"]
    gpus.apply_gpu_ids([], env)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and gpus.get_gpu_ids() == []
