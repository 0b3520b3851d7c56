"""Helpers shared by the kernel tests (imported by module name; tests/kernels is on sys.path)."""

import torch

IO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DT_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

#: fp32 outputs: the kernels' fp32 rsqrt / reduction order / exp may differ from torch's in the
#: last bits; relative 1e-5, plus a tiny absolute slack for results that cancel to ~0.
FP32_RTOL = 1e-5
FP32_ATOL = 2e-6


def _ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Map bf16/fp16 values to integers whose difference is the distance in ulps."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16)
    return (_ordered_bits(a) - _ordered_bits(b)).abs()


#: bf16/fp16: the share of elements allowed to differ AT ALL from the reference.  The reference
#: rounds where the kernel rounds, so mismatches only come from last-bit fp32 differences (rsqrt,
#: reduction order, tanh) landing on an io-dtype rounding boundary: well under 1%.  A missing or
#: extra rounding step stays within ~1 ulp but changes ~20% of the elements, and is caught here.
MAX_MISMATCH_FRAC = 0.03


def check_mismatch_fraction(out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    n_bad = int((out.cpu() != ref.cpu()).sum())
    allowed = max(1, int(MAX_MISMATCH_FRAC * out.numel()))
    assert n_bad <= allowed, f"{what}: {n_bad}/{out.numel()} elements not bit-exact (allowed {allowed})"


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """fp32: rtol 1e-5; bf16/fp16: at most 1 ulp apart element by element, and almost all exact."""
    out = out.cpu()
    ref = ref.cpu()
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert out.dtype == ref.dtype, (what, out.dtype, ref.dtype)
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output?)"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=FP32_RTOL, atol=FP32_ATOL, msg=lambda m: f"{what}: {m}")
    else:
        d = ulp_distance(out, ref)
        assert int(d.max()) <= 1, (
            f"{what}: {int((d > 1).sum())} elements more than 1 ulp off (max {int(d.max())} ulp)"
        )
        check_mismatch_fraction(out, ref, what)


def poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rand(shape, dtype, device="cpu", scale=1.0) -> torch.Tensor:
    return (torch.randn(shape) * scale).to(dtype).to(device)


def rand_weight(n, dtype, device="cpu") -> torch.Tensor:
    """Random norm weight (signed, not near-constant): exercises the ``* w`` path for real."""
    return (torch.randn(n) * 0.5 + 1.0).to(dtype).to(device)


def rand_scalar(dtype, shape=(1,), device="cpu") -> torch.Tensor:
    return (1.0 + 0.1 * torch.randn(())).reshape(shape).to(dtype).to(device)


def rope_tables(bsz, seq, d, dtype, device="cpu", theta=10000.0):
    """HF-style cos/sin [B, S, D] (cat(freqs, freqs)), per-sequence position offsets."""
    pos = torch.arange(seq, dtype=torch.float32)[None, :] + 3.0 * torch.arange(bsz, dtype=torch.float32)[:, None]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)
