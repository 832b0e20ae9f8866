"""The fp8 kernel experiments in benchmarks/ (convolution, attention), run by Triton's CPU interpreter on tiny shapes:
their kernels must compute what they claim before a GPU run times them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter check is for CPU machines")
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def interpreted_rows(script: str) -> list[list[str]]:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--interpret"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("| tiny")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_fp8_convolution_matches_cudnns_definition():
    rows = interpreted_rows("conv_fp8_h200.py")
    assert len(rows) == 3  # 3x3, 3x3 with stride 2, 1x1
    for name, unquantized_error, fp8_error in rows:
        assert float(unquantized_error) < 0.01, name  # the gather, masks and bias: exact up to bf16 rounding
        assert float(fp8_error) < 0.06, name  # e4m3 activations and weights


def test_fp8_attention_matches_scaled_dot_product_attention():
    rows = interpreted_rows("attention_fp8_h200.py")
    assert len(rows) == 2  # one block of keys, and a length that leaves a partial block
    for name, unquantized_error, fp8_error, layouts_differ in rows:
        assert float(unquantized_error) < 0.01, name  # online softmax and masking
        assert float(fp8_error) < 0.1, name  # e4m3 q, k, v and probabilities
        assert float(layouts_differ) == 0, name  # v transposed or not: the same numbers
