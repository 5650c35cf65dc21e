"""Device names resolve to devices that exist, or give one clear error."""

import pytest
import torch

from bae.common.devices import resolve_device, to_device
from bae.common.errors import BaeError


def test_auto_and_cpu_resolve_to_existing_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    mps = torch.backends.mps.is_available()
    expected = "cuda" if torch.cuda.is_available() else ("mps" if mps else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device(" AUTO ").type == expected


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu:0", ""])
def test_unknown_names_are_refused(spec):
    with pytest.raises(BaeError, match="expected auto, cpu"):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(BaeError, match="no CUDA device is visible"):
        resolve_device("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_beyond_the_visible_devices_is_refused():
    with pytest.raises(BaeError, match="visible"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_to_device_keeps_the_values_and_lands_on_the_device():
    host = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    moved = to_device(host, resolve_device("auto"))
    assert moved.device.type == resolve_device("auto").type
    assert torch.equal(moved.cpu(), host)
