"""Bad input gets one clear LogartError that names the problem and the fix."""

import pytest
import torch

from logart.errors import LogartError
from logart.quant import QuantSpec, make_codebook, pack, unpack


def test_unsupported_bits_lists_the_supported_ones():
    with pytest.raises(LogartError, match=r"5-bit.*not supported.*2, 3, 4, 8"):
        QuantSpec("uniform", bits=5)
    with pytest.raises(LogartError, match=r"8-bit log codebooks.*2, 3, 4 bits"):
        make_codebook(QuantSpec("log_dynamic", bits=8))


def test_unknown_method_and_mode():
    with pytest.raises(LogartError, match="unknown quantization method 'log3'.*log_dynamic"):
        QuantSpec("log3")
    with pytest.raises(LogartError, match="unknown codebook mode"):
        QuantSpec(mode="loose")


def test_group_size_must_be_valid():
    # a group size that does not divide the row is fine (a shorter last group: tests/test_partial_groups.py)
    with pytest.raises(LogartError, match="group size -3 is not valid"):
        QuantSpec(group_size=-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_weights(bad):
    w = torch.randn(4, 8)
    w[2, 3] = bad
    for method in ("log_dynamic", "uniform"):
        with pytest.raises(LogartError, match=r"1 NaN/inf value\(s\) out of 32"):
            make_codebook(QuantSpec(method, 4)).fake_quant(w)


def test_empty_and_integer_tensors():
    cb = make_codebook(QuantSpec("log2", 3))
    with pytest.raises(LogartError, match="the weight is empty"):
        cb.fake_quant(torch.empty(0, 8))
    with pytest.raises(LogartError, match="floating-point weight is needed"):
        cb.fake_quant(torch.ones(2, 2, dtype=torch.int32))


def test_packing_errors():
    with pytest.raises(LogartError, match="cannot pack 5-bit codes"):
        pack(torch.zeros(4, dtype=torch.long), 5)
    with pytest.raises(LogartError, match="codes out of range for 3 bits"):
        pack(torch.tensor([0, 8]), 3)
    with pytest.raises(LogartError, match="truncated"):
        unpack(torch.zeros(2, dtype=torch.int32), 3, 32)
