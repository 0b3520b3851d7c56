"""Whole tiny Gemma-4 models: every layer matched as the config predicts, and parity.

Parity as the project defines it, over 8 greedy decode steps (LM head scaled so
random-weight logits are peaked and argmax means something):
fp32 within 1e-4 relative error of eager with identical tokens; bf16 no worse
than Inductor alone (error <= 1.5x, token agreement no lower).
"""

import pytest
import torch

from gemma4_passes import expected, models, parity

STEPS = 8

CASES = [
    ("tiny-e2b", torch.float32),   # PLE, KV-shared layers (q-only attention), double-wide MLP
    ("tiny-e4b", torch.float32),   # PLE, KV-shared, GQA 4/2
    ("tiny-31b", torch.float32),   # dense, k_eq_v full layers
    ("tiny-26b-a4b", torch.float32),  # MoE: post-attention residual feeds three norms
    ("tiny-e2b", torch.bfloat16),
    ("tiny-31b", torch.bfloat16),
]


@pytest.mark.parametrize("preset,dtype", CASES, ids=[f"{p}-{str(d)[6:]}" for p, d in CASES])
def test_tiny_preset_matches_and_parity(preset, dtype):
    model = models.build_model(preset, dtype=dtype, seed=1, lm_head_scale=4.0)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=g)
    runs = parity.run_all(model, ids, STEPS)
    want = expected.expected_matches(preset)
    assert runs["passes"].matches == want
    assert sum(want.values()) > 0
    cmp = parity.compare(runs)
    ok, why = parity.verdict(cmp, dtype)
    assert ok, why
    if dtype == torch.float32:
        # fp32 is exact up to reassociation: identical greedy tokens to Inductor alone too
        assert torch.equal(runs["passes"].tokens, runs["eager"].tokens)
