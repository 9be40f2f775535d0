"""cir_kernels.sample's launch plans never change a token: 192 rows with every mix of settings (greedy,
temperature only, top-k, top-p, min-p, combinations; ties and -inf tails), drawn under four plans
of the Triton launcher (through TRITON_INTERPRET=1), give the same tokens and log-probs:
  - the default: the whole row fits the buffer (COMPACT_CAP 8192), one refine launch settles it
  - pivot passes split over programs, then the solo launch (COMPACT_CAP 2, SPLIT_REFINE_PASSES 2)
  - no split refine launch: the solo launch does every pass, every launch made (may_filter all True)
  - rows split over 2 programs (MIN_CHUNK 16) with a 12-token buffer (pivot passes, then the buffer)

    pytest tests/test_kernels_sampling_plans.py
"""
import pytest
import torch

from cir_kernels import sampling_triton
from cir_kernels._checks import prepare_sampling

# interpreter: log(0) in masked lanes; slow: ~2 CPU minutes through the interpreter (3,000+ programs)
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.slow]

NUM_ROWS, VOCAB = 192, 32
PLANS = {
    "default": dict(),
    "pivot passes, then solo": dict(COMPACT_CAP=2, SPLIT_REFINE_PASSES=2),
    "solo only, every launch": dict(COMPACT_CAP=2, SPLIT_REFINE_PASSES=0, may_filter=(True, True, True)),
    "split rows, small buffer": dict(COMPACT_CAP=12, MIN_CHUNK=16),
}


def _batch() -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(NUM_ROWS, VOCAB, generator=gen) * 2
    logits[::5] = logits[::5].round()  # ties at the thresholds
    logits[1::7, 20:] = float("-inf")  # a masked vocabulary tail
    pick = torch.randint(0, 2, (4, NUM_ROWS), generator=gen).bool()  # which filters each row uses
    temperature = torch.where(torch.rand(NUM_ROWS, generator=gen) < 0.1, 0.0,
                              0.3 + 1.2 * torch.rand(NUM_ROWS, generator=gen))
    top_k = torch.where(pick[0], torch.randint(1, VOCAB + 4, (NUM_ROWS,), generator=gen), 0)
    top_p = torch.where(pick[1], 0.2 + 0.79 * torch.rand(NUM_ROWS, generator=gen), 1.0)
    min_p = torch.where(pick[2], 0.3 * torch.rand(NUM_ROWS, generator=gen), 0.0)
    params = prepare_sampling(logits, temperature, top_p, top_k, min_p)
    seeds = torch.arange(NUM_ROWS, dtype=torch.int64) * 7919 + 11
    return logits, params, seeds


def test_launch_plans_never_change_a_token(monkeypatch):
    logits, params, seeds = _batch()
    results = {}
    for name, plan in PLANS.items():
        plan = dict(plan)
        may_filter = plan.pop("may_filter", (True, True, True))
        with monkeypatch.context() as patch:
            for constant, value in plan.items():
                patch.setattr(sampling_triton, constant, value)
            results[name] = sampling_triton.sample_triton(logits, *params, seeds, may_filter=may_filter,
                                                          return_passes=True)
    tokens, logprobs, passes = results["default"]
    assert int((results["pivot passes, then solo"][2] > 2).sum()) > 0  # some rows reached the solo launch
    assert len(set(tokens.tolist())) > VOCAB // 2  # the rows drew many different tokens
    for name, (other_tokens, other_logprobs, _) in results.items():
        assert torch.equal(other_tokens, tokens), (name, (other_tokens != tokens).nonzero().squeeze(1).tolist())
        torch.testing.assert_close(other_logprobs, logprobs, atol=1e-6, rtol=1e-6)
