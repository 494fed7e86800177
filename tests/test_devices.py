"""Device handling that a GPU run depends on, checked here without one: the `meta` device stands in for a GPU (a
tensor there has a device and a shape but no values), and a launcher's environment is set by hand."""

import argparse

import pytest
import torch

from msdd import Tokenizer
from msdd.cli.common import device_arg
from msdd.dist import DistInfo, init_distributed, local_gpu, process_device
from msdd.eval.bench import BenchSettings


def test_a_fixed_gpu_under_several_processes_is_refused_before_the_environment_is_touched(monkeypatch):
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="--device cuda:0 under 2 processes would put every process on GPU 0: pass "
                                         "--device cuda"):
        init_distributed("cuda:0")  # was: every rank on GPU 0 (NCCL: "Duplicate GPU detected")


def test_each_process_takes_a_gpu_it_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # torchrun: every process sees the node's GPUs
    assert local_gpu(3) == 3 and process_device("cuda", DistInfo(3, 4, 3)) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # SLURM --gpus-per-task=1: each sees its own GPU
    assert local_gpu(3) == 0 and process_device("cuda", DistInfo(3, 4, 3)) == torch.device("cuda", 0)
    assert process_device("cpu", DistInfo(3, 4, 3)) == torch.device("cpu")


@pytest.mark.parametrize("device", ["xpu", "hpu", "meta"])
def test_devices_msdd_does_not_run_on_are_refused_by_name(device):
    with pytest.raises(argparse.ArgumentTypeError, match=f"{device}: no {device} device is visible"):
        device_arg(device)  # was: accepted, then a traceback from inside torch


def test_cpu_only_bench_rows_are_refused_on_another_device():
    with pytest.raises(ValueError, match=r"--contenders: \['student-int8', 'onnx-student'\] run on the CPU only"):
        BenchSettings(device="cuda", contenders=("student", "student-int8", "onnx-student"))


def test_latents_on_another_device_are_normalised_on_theirs():
    tok = Tokenizer.from_pretrained()
    z = torch.randn(2, *tok.config.latent_shape)
    elsewhere = z.to("meta")  # latents on another device than the model's (saved CPU latents, a GPU model)
    assert tok.normalize_latents(elsewhere).device == elsewhere.device == tok.denormalize_latents(elsewhere).device
    assert torch.allclose(tok.denormalize_latents(tok.normalize_latents(z)), z, atol=1e-5)
