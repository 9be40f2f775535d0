"""cir_kernels.sample (Triton through TRITON_INTERPRET=1) and cir_kernels.sample_reference: statistical
correctness of temperature / top-k / top-p / min-p (chi-square against the exact filtered,
renormalised distribution), greedy, log-probs, determinism, per-row streams, bad input.

    pytest tests/test_kernels_sampling.py
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from cir_kernels import sample, sample_reference
from cir_kernels import sampling_triton

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: log(0) in masked lanes

# A fixed small distribution, deliberately not sorted.
PROBS = [0.07, 0.30, 0.02, 0.15, 0.10, 0.20, 0.04, 0.12]
LOGITS = torch.log(torch.tensor(PROBS))
# (temperature, top_k, top_p, min_p): each filter alone, then all together
CONFIGS = [(0.7, 0, 1.0, 0.0), (1.0, 3, 1.0, 0.0), (1.0, 0, 0.6, 0.0), (1.0, 0, 1.0, 0.3), (1.3, 5, 0.8, 0.2)]
NUM_DRAWS = {"torch": 20000, "triton": 60}  # the interpreter runs ~20-130 ms per row


def filtered_distribution(temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Exact target distribution, written out with Python sorting: top-k, top-p on the renormalised
    top-k set, min-p, renormalise."""
    p = np.exp(np.log(np.array(PROBS, dtype=np.float64)) / temperature)
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept = order[:top_k] if 0 < top_k < len(p) else order
    target, cum, prefix = top_p * p[kept].sum(), 0.0, []
    for i in kept:
        prefix.append(i)
        cum += p[i]
        if cum >= target:
            break
    kept = [i for i in prefix if p[i] >= min_p * p.max()]
    q = np.zeros_like(p)
    q[kept] = p[kept]
    return q / q.sum()


def assert_matches_distribution(tokens: torch.Tensor, expected: np.ndarray) -> None:
    counts = np.bincount(tokens.numpy(), minlength=len(expected)).astype(np.float64)
    assert counts[expected == 0].sum() == 0, f"drew filtered-out tokens: counts {counts}, expected {expected}"
    exp_counts = expected * counts.sum()
    likely = exp_counts >= 10  # missed with probability < e^-10 each
    assert bool((counts[likely] > 0).all()), f"a kept token never drawn: counts {counts}, expected {exp_counts}"
    support = expected > 0
    obs, exp = counts[support], exp_counts[support]
    small = exp < 5  # pool sparse bins so the chi-square approximation holds
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    if len(obs) > 1:
        p_value = chisquare(obs, exp).pvalue
        assert p_value > 1e-3, f"chi-square p = {p_value:.2g}: counts {counts}, expected {exp_counts}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temperature,top_k,top_p,min_p", CONFIGS)
def test_frequencies_match_filtered_distribution(backend, temperature, top_k, top_p, min_p):
    num_draws = NUM_DRAWS[backend]
    if backend == "triton" and (temperature, top_k, top_p, min_p) == CONFIGS[-1]:
        num_draws = 40  # the combined case costs two radix selects per row
    logits = LOGITS.expand(num_draws, -1).contiguous()
    tokens, logprobs = sample(logits, temperature, top_p, top_k, min_p, generator=12345, backend=backend)
    assert_matches_distribution(tokens, filtered_distribution(temperature, top_k, top_p, min_p))
    # log-prob over the full vocabulary, before filtering
    full = torch.log_softmax(LOGITS / temperature, dim=0)[tokens]
    torch.testing.assert_close(logprobs, full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_and_mixed_rows(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 301, generator=gen) * 2).to(dtype)
    logits[2, 17] = logits[2, 250] = logits[2].max() + 1  # a tie: the lower index wins
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.5, 2.0, 0.0])
    top_p = torch.tensor([0.5, 0.9, 1.0, 1.0, 0.7, 0.3])
    tokens, logprobs = sample(logits, temperature, top_p=top_p, top_k=20, generator=3, backend=backend)
    greedy = temperature == 0
    x = logits.float()
    assert torch.equal(tokens[greedy], x[greedy].argmax(dim=1)) and tokens[2] == 17
    t_eff = torch.where(greedy, 1.0, temperature)
    expected = torch.log_softmax(x / t_eff[:, None], dim=1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)
    # sampled rows stay inside their top-20
    for row in (~greedy).nonzero().squeeze(1).tolist():
        assert x[row, tokens[row]] >= x[row].topk(20).values[-1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_same_seed_same_tokens_and_rows_independent(backend):
    logits = torch.zeros(16, 50)  # uniform rows: identical inputs, so only the streams differ
    first, _ = sample(logits, 1.0, generator=99, backend=backend)
    again, _ = sample(logits, 1.0, generator=99, backend=backend)
    other, _ = sample(logits, 1.0, generator=100, backend=backend)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len(set(first.tolist())) > 8  # rows do not share a stream
    seeds = torch.arange(16) * 7919
    by_row, _ = sample(logits, 1.0, generator=seeds, backend=backend)
    assert torch.equal(by_row, sample(logits, 1.0, generator=seeds, backend=backend)[0])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sample(logits, 1.0, generator=g1, backend=backend)[0],
                       sample(logits, 1.0, generator=g2, backend=backend)[0])


def test_triton_draw_does_not_depend_on_block_size(monkeypatch):
    """Philox counter = vocabulary index: tiny blocks (multi-block radix passes, cross-block argmax)
    must pick exactly the tokens of the single-block launch."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=gen) * 3
    logits[4, 100:] = float("-inf")  # a masked vocabulary tail is never drawn
    args = dict(temperature=torch.tensor([0.0, 1.0, 0.8, 1.2, 1.0]), top_p=torch.tensor([1.0, 0.9, 1.0, 0.5, 0.95]),
                top_k=torch.tensor([0, 0, 30, 40, 0]), min_p=torch.tensor([0.0, 0.0, 0.0, 0.05, 0.0]), generator=7)
    big = sample(logits, backend="triton", **args)
    monkeypatch.setattr(sampling_triton, "BLOCK_V", 64)
    monkeypatch.setattr(sampling_triton, "RADIX_BLOCK_V", 16)
    small = sample(logits, backend="triton", **args)
    assert torch.equal(big[0], small[0])
    torch.testing.assert_close(big[1], small[1], atol=1e-5, rtol=1e-5)
    assert big[0][4] < 100 and big[0][0] == logits[0].argmax()


def test_cpu_default_is_the_reference():
    logits = torch.randn(4, 40)
    assert torch.equal(sample(logits, 1.0, top_p=0.9, generator=11)[0],
                       sample_reference(logits, 1.0, top_p=0.9, generator=11)[0])


BAD = [
    ("logits", dict(logits=torch.randint(0, 5, (2, 8)))),
    ("logits", dict(logits=torch.randn(8))),
    ("logits", dict(logits=torch.randn(8, 2).t())),  # last dim not contiguous
    ("temperature", dict(temperature=-0.5)),
    ("temperature", dict(temperature=torch.tensor([1.0, -1.0]))),
    ("temperature", dict(temperature=torch.ones(3))),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_p", dict(top_p=torch.tensor([0.5, 0.0]))),
    ("top_k", dict(top_k=-1)),
    ("top_k", dict(top_k=2.5)),
    ("min_p", dict(min_p=1.5)),
    ("generator", dict(generator="seed")),
    ("generator", dict(generator=torch.arange(3))),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,bad", BAD, ids=[f"{n}{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_input_names_argument(backend, name, bad):
    args = {"logits": torch.randn(2, 8), "temperature": 1.0, **bad}
    with pytest.raises(ValueError, match=name):
        sample(**args, backend=backend)


def test_top_k_at_least_vocab_and_top_p_one_are_no_ops():
    logits = LOGITS.expand(20000, -1).contiguous()
    tokens, _ = sample_reference(logits, 1.0, top_p=1.0, top_k=100, generator=0)
    assert_matches_distribution(tokens, filtered_distribution(1.0, 0, 1.0, 0.0))
    assert math.isclose(sum(PROBS), 1.0)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [CONFIGS[0], CONFIGS[-1]])
def test_per_row_seeds_follow_the_distribution(temperature, top_k, top_p, min_p):
    # the engine's seeds: consecutive small integers mixed per sequence and position must still give
    # independent, correctly distributed draws (the reference hashes each seed with SplitMix64)
    seeds = torch.arange(20000, dtype=torch.int64) * 7 + 3
    logits = LOGITS.expand(len(seeds), -1).contiguous()
    tokens, _ = sample_reference(logits, temperature, top_p, top_k, min_p, generator=seeds)
    assert_matches_distribution(tokens, filtered_distribution(temperature, top_k, top_p, min_p))
    half = sample_reference(logits[:5000], temperature, top_p, top_k, min_p, generator=seeds[:5000])[0]
    assert torch.equal(half, tokens[:5000])  # a row's draw depends on its seed only


def test_inverse_cdf_across_chunks_follows_the_weights():
    # 3 x 256 + 5 weights: the mass sits on both sides of each chunk boundary and in the ragged last
    # chunk, whole chunks are empty, zeros sit between kept tokens; also the two extremes of u
    from cir_kernels.sampling_reference import inverse_cdf

    vocab = 3 * 256 + 5
    weights = torch.zeros(vocab)
    kept = {0: 1.0, 255: 3.0, 256: 2.0, 258: 0.5, 767: 1.5, 768: 2.5, 772: 0.25}
    for i, w in kept.items():
        weights[i] = w
    draws = 40000
    u = torch.rand(draws, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tokens = inverse_cdf(weights.expand(draws, -1).contiguous(), u)
    expected = weights.double().numpy() / weights.sum().item()
    assert_matches_distribution(tokens, expected)
    edges = inverse_cdf(weights.expand(2, -1).contiguous(), torch.tensor([[0.0], [1.0 - 2**-53]], dtype=torch.float64))
    assert edges.tolist() == [0, 772]  # the first and the last kept token, never a zero weight


# ---------------------------------------------------------------- the split Triton path
# A row is split over ceil(V / MIN_CHUNK) programs; at V = 8 and MIN_CHUNK = 4 that is 2 programs
# per row (at V = 152064 it is 75). The split depends on V only, so a row's token does not depend on
# the batch: B = 1 draws equal the same rows' draws inside a large batch (checked below), which is
# why the chi-square runs once, on a large batch (the interpreter costs ~30 ms per program).
COMBINED = CONFIGS[-1]


def _key(x: torch.Tensor) -> torch.Tensor:
    """The kernel's order-preserving int key of float32 logits (-0.0 counted as +0.0)."""
    bits = torch.where(x == 0, 0.0, x).float().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -1 - bits, bits + 2**31)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,cap",
                         [(*CONFIGS[2], 8192), (*COMBINED, 8192), (*COMBINED, 2)])
def test_split_rows_follow_the_filtered_distribution(monkeypatch, temperature, top_k, top_p, min_p, cap):
    """cap 8192: the whole row goes to the buffer at once; cap 2: pivot passes, then the race pass."""
    monkeypatch.setattr(sampling_triton, "MIN_CHUNK", 4)
    monkeypatch.setattr(sampling_triton, "COMPACT_CAP", cap)
    assert sampling_triton.split_plan(len(PROBS))[0] == 2
    num_rows = 48
    seeds = torch.arange(num_rows, dtype=torch.int64) * 1000003 + 17
    logits = LOGITS.expand(num_rows, -1).contiguous()
    tokens, logprobs = sample(logits, temperature, top_p, top_k, min_p, generator=seeds, backend="triton")
    assert_matches_distribution(tokens, filtered_distribution(temperature, top_k, top_p, min_p))
    torch.testing.assert_close(logprobs, torch.log_softmax(LOGITS / temperature, dim=0)[tokens], atol=1e-6, rtol=1e-6)
    for row in (0, 29):  # B = 1, same seed: the token it got inside the batch
        alone, _ = sample(logits[row:row + 1], temperature, top_p, top_k, min_p, generator=seeds[row:row + 1],
                          backend="triton")
        assert alone.item() == tokens[row].item()


@pytest.mark.parametrize("cap", [8192, 12, 2])
def test_split_thresholds_are_exact(monkeypatch, cap):
    """Rows split over 5 programs, every filter mix, ties, a -inf tail, top_k >= V: the kept set
    {key(x) >= theta, p >= min_p * max p} (theta read from the kernel's row state) equals the
    reference's (sorting), and the split launch draws the unsplit launch's tokens. cap: the bracket
    size settled from the buffer (8192: at once; 12: after pivot passes, top-k from the buffer then
    top-p back on the full row; 2: pivot passes only)."""
    from cir_kernels.sampling_reference import keep_mask

    monkeypatch.setattr(sampling_triton, "COMPACT_CAP", cap)

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 37, generator=gen) * 4
    logits[1] = logits[1].round()  # ties at the thresholds
    logits[3, 20:] = float("-inf")
    args = dict(temperature=torch.tensor([0.0, 1.0, 0.6, 1.0, 1.5, 1.0, 0.9]),
                top_p=torch.tensor([0.5, 0.7, 1.0, 0.9, 0.3, 1.0, 0.5]),
                top_k=torch.tensor([3, 6, 5, 25, 0, 40, 20]),
                min_p=torch.tensor([0.0, 0.0, 0.2, 0.0, 0.01, 0.3, 0.0]),
                generator=torch.arange(7, dtype=torch.int64) * 7 + 1)
    temperature = args["temperature"]
    z = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    expected = keep_mask(z, torch.logsumexp(z, 1), args["top_p"], args["top_k"], args["min_p"])[1:]

    race, states = sampling_triton._race_kernel, []

    class Spy:  # records the row state (phase, theta, ...) that the race kernel reads
        def __getitem__(self, grid):
            def launch(*launch_args, **kwargs):
                states.append(launch_args[8].clone())
                return race[grid](*launch_args, **kwargs)
            return launch

    monkeypatch.setattr(sampling_triton, "_race_kernel", Spy())
    whole = sample(logits, backend="triton", **args)
    monkeypatch.setattr(sampling_triton, "MIN_CHUNK", 8)
    assert sampling_triton.split_plan(37)[0] == 5
    split = sample(logits, backend="triton", **args)
    for state in states:
        assert set(state[1:, 0].tolist()) <= {2, 3}  # every sampled row settled before the race (3: done)
        theta = state[1:, 1]
        min_p_ok = z[1:] >= z[1:].amax(1, keepdim=True) + args["min_p"][1:, None].log()
        kept = (_key(logits[1:]) >= theta[:, None]) & min_p_ok
        assert torch.equal(kept, expected), (kept.sum(1), expected.sum(1))
    assert torch.equal(whole[0], split[0]) and split[0][0] == logits[0].argmax()
    torch.testing.assert_close(whole[1], split[1], atol=1e-6, rtol=1e-6)
    assert bool(expected.gather(1, split[0][1:, None]).all())


@pytest.mark.parametrize("cap,min_chunk", [(8192, 2048), (2, 8)])
def test_passes_a_row_does_not_need_change_nothing(monkeypatch, cap, min_chunk):
    """With CUDA tensors as parameters every pass is launched (reading them would synchronise): rows
    that are greedy, temperature-only or already settled must skip those launches unchanged. With
    cap 2 and 3 chunks a row runs pivot passes split over programs, then in the solo launch: one
    more split launch (the plan when top-k may be used) must not change its token either."""
    from cir_kernels._checks import prepare_sampling

    monkeypatch.setattr(sampling_triton, "COMPACT_CAP", cap)
    monkeypatch.setattr(sampling_triton, "MIN_CHUNK", min_chunk)
    monkeypatch.setattr(sampling_triton, "SPLIT_REFINE_PASSES", 1)

    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(8)) * 2
    logits[2] = logits[2].round()  # ties: the bracket shrinks to one key, pass after pass
    params = prepare_sampling(logits, torch.tensor([0.0, 1.0, 0.8, 1.0]), torch.tensor([1.0, 1.0, 0.9, 1.0]),
                              torch.tensor([0, 0, 0, 4]), torch.tensor([0.0, 0.0, 0.0, 0.0]))
    seeds = torch.arange(4, dtype=torch.int64) + 40
    needed = sampling_triton.sample_triton(logits, *params, seeds, may_filter=(True, True, False))
    every = sampling_triton.sample_triton(logits, *params, seeds, may_filter=(True, True, True))
    assert torch.equal(needed[0], every[0]) and torch.equal(needed[1], every[1])
    plain = sampling_triton.sample_triton(logits[:2], *(p[:2] for p in params), seeds[:2],
                                          may_filter=(False, False, False))
    assert torch.equal(plain[0], every[0][:2])
    rows = slice(1, 3)  # no top-k: 1 split refine launch then the solo one, instead of 2 then solo
    top_p_only = sampling_triton.sample_triton(logits[rows], *(p[rows] for p in params), seeds[rows],
                                        may_filter=(False, True, False), return_passes=True)
    assert torch.equal(top_p_only[0], every[0][rows]) and torch.equal(top_p_only[1], every[1][rows])
    if cap == 2:
        assert top_p_only[2][1] > sampling_triton.SPLIT_REFINE_PASSES  # the top-p row reached the solo launch


def test_kernels_compile_for_sm90(compile_sm90):
    """The interpreter does not type-check like the compiler (loop-carried types, scalar branches,
    constexpr strings): compile the three kernels to an sm_90 cubin, which needs no GPU."""
    F, I32, I64 = "*fp32", "*i32", "*i64"
    row = dict(logits_ptr=F, logits_row_stride="i64", temperature_ptr=F)
    params = dict(top_p_ptr=F, top_k_ptr=I64, min_p_ptr=F, seed_ptr=I64)
    out = dict(tokens_ptr=I64, logprobs_ptr=F)
    compile_sm90("cir_kernels.sampling_triton", [
        ("_stats_kernel", {**row, **params, "part_f_ptr": F, "part_i_ptr": I32, "state_f_ptr": F, "state_i_ptr": I64,
                           "counter_ptr": I32, **out, "V": "i32", "chunk": "i32", "num_splits": "i32"},
         {"BLOCK_V": 1024, "BLOCK_S": 128}),
        ("_refine_kernel", {**row, **params, "count_part_ptr": I32, "mass_part_ptr": F, "part_f_ptr": F,
                            "part_i_ptr": I32, "buf_x_ptr": F, "buf_i_ptr": I32, "state_f_ptr": F, "state_i_ptr": I64,
                            "counter_ptr": I32, "cursor_ptr": I32, **out, "V": "i32", "chunk": "i32",
                            "num_splits": "i32", "cap": "i32", "max_passes": "i32", "num_passes": "i32",
                            "chunks_per_program": "i32", "num_programs": "i32"},
         {"NUM_PIVOTS": 32, "BLOCK_V": 128, "BLOCK_S": 128}),
        ("_race_kernel", {**row, "min_p_ptr": F, "seed_ptr": I64, "part_f_ptr": F, "part_i_ptr": I32,
                          "state_f_ptr": F, "state_i_ptr": I64, "counter_ptr": I32, **out, "V": "i32", "chunk": "i32",
                          "num_splits": "i32"},
         {"BLOCK_V": 1024, "BLOCK_S": 128}),
    ])
