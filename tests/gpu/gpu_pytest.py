"""Runs one module of the gpu suite with pytest, or exits 77 (a skip for Meson) where PyTorch
sees no CUDA device: `python gpu_pytest.py test_gpu_x.py [pytest arguments]`."""
import os
import sys

import torch

if os.environ.get("DSD_GPU_REHEARSAL"):
    print("DSD_GPU_REHEARSAL: the suite's logic on CPU tensors (a rehearsal, not a GPU check)", flush=True)
    sys.exit(__import__("pytest").main(["-q", "-rsx", "-p", "no:cacheprovider", *sys.argv[1:]]))
if not torch.cuda.is_available():
    print(f"no CUDA device visible to PyTorch {torch.__version__}: skipping {' '.join(sys.argv[1:])}")
    sys.exit(77)

import pytest  # noqa: E402

print(f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}", flush=True)
sys.exit(pytest.main(["-q", "-rsx", "-p", "no:cacheprovider", *sys.argv[1:]]))
