"""cir_kernels.sample (Triton through TRITON_INTERPRET=1) and cir_kernels.sample_reference: statistical
correctness of temperature / top-k / top-p / min-p (chi-square against the exact filtered,
renormalised distribution), greedy, log-probs, determinism, per-row streams, bad input.

    pytest tests/test_kernels_sampling.py
"""
import math

import numpy as np
import pytest
import torch
from sampling_power import CountTest, exact_distribution

from cir_kernels import sample, sample_reference
from cir_kernels import sampling_triton

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: log(0) in masked lanes

# A fixed small distribution, deliberately not sorted.
PROBS = [0.07, 0.30, 0.02, 0.15, 0.10, 0.20, 0.04, 0.12]
LOGITS = torch.log(torch.tensor(PROBS))
# (temperature, top_k, top_p, min_p): each filter alone, then all together
CONFIGS = [(0.7, 0, 1.0, 0.0), (1.0, 3, 1.0, 0.0), (1.0, 0, 0.6, 0.0), (1.0, 0, 1.0, 0.3), (1.3, 5, 0.8, 0.2)]


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
    """The rule of tests/sampling_power.py (false-alarm rate <= 1e-4) on the draws of one distribution."""
    why = CountTest(np.asarray(expected, dtype=np.float64), len(tokens)).rejection(tokens.numpy())
    assert why is None, why


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", CONFIGS)
def test_reference_frequencies_match_filtered_distribution(temperature, top_k, top_p, min_p):
    """The torch twin, 20000 draws (the Triton path: the powered tests below)."""
    num_draws, backend = 20000, "torch"
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


# ---------------------------------------------------------------- the Triton path, with stated power
# Every test below runs the kernels through the interpreter (~30 ms per program and launch, so rows
# are the cost) and decides with the rule of tests/sampling_power.py. Each states, and asserts, its
# false-alarm rate (<= 1e-4) and its power (>= 0.999) against the bugs it names; the distributions
# are built so that those bugs change what is drawn as much as a few hundred rows can see:
# - temperature off by 10%: one token 7.2 / T above 1023 equal ones (V = 1024): p(top) = 0.567, and
#   0.464 / 0.669 at 1.1 T / 0.9 T; 480 rows (one temperature-only launch, one program a row)
# - top-k off by one: the k-th token is drawn 25% of the time (k - 1 drops it), the (k + 1)-th holds
#   18% of the (k + 1)-set
# - top-p mass off by 3%: cumulative masses 0.4855 | 0.5145 | 0.5425 around top_p = 0.5, so 0.97 top_p
#   drops the third token (5.6% of the draws) and 1.03 top_p adds the fourth
# - min-p halved (0.3 -> 0.15): four tokens at 0.22 p_max (24% of the mass) come in
# - the race without temperature (`x + gumbel` for `x * inv_t + gumbel`): T = 0.3 flattens a lot
# - log-prob without temperature: every test compares the log-probs with log_softmax(x / T) (1e-5,
#   fp32 over V <= 1024 terms): T != 1 everywhere, so false alarm 0 and power 1
# Rows carry their own seeds: their draws are independent. The filter tests share one launch whose
# rows mix the settings (per-row tensors), which is the mixed-settings test too.
SMALL_T = 0.3


def _design(probs: list[float], temperature: float, seed: int) -> np.ndarray:
    """Logits (float64) whose softmax at `temperature` is `probs`, in a shuffled vocabulary order."""
    perm = np.random.default_rng(seed).permutation(len(probs))
    return (temperature * np.log(np.asarray(probs, dtype=np.float64)))[perm]


def _spread(mass: float, num: int) -> list[float]:
    return [mass / num] * num


TEMP_T, TEMP_ROWS = 0.7, 480
TEMP_LOGITS = np.zeros(1024)
TEMP_LOGITS[517] = 7.2 * TEMP_T
# (name, logits, settings, rows, bugs: name -> the distribution the bug samples)
TOP_K = _design([0.32, 0.24, 0.18, 0.16] + _spread(0.10, 28), SMALL_T, 1)
TOP_P = _design([0.30, 0.1855, 0.029, 0.028] + _spread(1 - 0.5425, 28), SMALL_T, 2)
MIN_P = _design([0.25, 0.20, 0.14, 0.11] + [0.055] * 4 + _spread(0.08, 24), SMALL_T, 3)
MIXED = [
    ("top-k", TOP_K, dict(top_k=3), 48, {"top_k - 1": dict(top_k=2), "top_k + 1": dict(top_k=4)}),
    ("top-p", TOP_P, dict(top_p=0.5), 192, {"0.97 top_p": dict(top_p=0.485), "1.03 top_p": dict(top_p=0.515)}),
    ("top-k + top-p", TOP_P, dict(top_k=4, top_p=0.5 / 0.5425), 192,  # top-p's target 0.5 of the top-4 mass
     {"0.97 target": dict(top_k=4, top_p=0.97 * 0.5 / 0.5425),
      "1.03 target": dict(top_k=4, top_p=1.03 * 0.5 / 0.5425)}),
    ("min-p", MIN_P, dict(min_p=0.3), 48, {"min_p / 2": dict(min_p=0.15)}),
    ("greedy", MIN_P, dict(temperature=0.0), 12, {"sampled": dict(temperature=SMALL_T)}),
]


def _without_temperature_in_race(logits: np.ndarray, temperature: float, **filters) -> np.ndarray:
    """The kept set of (T, filters), drawn with weights e^x instead of e^(x / T)."""
    keep = exact_distribution(logits, temperature, **filters) > 0
    w = np.where(keep, np.exp(logits - logits.max()), 0.0)
    return w / w.sum()


def _assert_stated(test: CountTest, bugs: dict[str, np.ndarray]) -> dict[str, float]:
    """The false-alarm rate <= 1e-4 and power >= 0.999 against each named bug; returns the powers."""
    assert test.false_alarm <= 1e-4 + 1e-12, test.false_alarm
    powers = {name: test.power(p1) for name, p1 in bugs.items()}
    assert min(powers.values()) >= 0.999, powers
    return powers


def _check_logprobs(logits: torch.Tensor, temperature: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor):
    t_eff = torch.where(temperature > 0, temperature, 1.0).double()
    expected = torch.log_softmax(logits.double() / t_eff[:, None], dim=1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-5, rtol=1e-5)


def test_temperature_rows_have_stated_power():
    """False alarm 1.0e-4; power 0.9995 (1.1 T), 0.99996 (0.9 T), 1.0 (T ignored: `x + gumbel`)."""
    test = CountTest(exact_distribution(TEMP_LOGITS, TEMP_T), TEMP_ROWS)
    bugs = {f"{f} T": exact_distribution(TEMP_LOGITS, f * TEMP_T) for f in (1.1, 0.9)}
    bugs["T ignored"] = exact_distribution(TEMP_LOGITS, 1.0)
    _assert_stated(test, bugs)
    logits = torch.tensor(TEMP_LOGITS, dtype=torch.float32).expand(TEMP_ROWS, -1).contiguous()
    seeds = torch.arange(TEMP_ROWS, dtype=torch.int64) * 1000003 + 7
    tokens, logprobs = sample(logits, TEMP_T, generator=seeds, backend="triton")
    why = test.rejection(tokens.numpy())
    assert why is None, why
    _check_logprobs(logits, torch.full((TEMP_ROWS,), TEMP_T), tokens, logprobs)


@pytest.fixture(scope="module")
def mixed_launch():
    """One launch: the rows of every MIXED design, interleaved, each with its own settings and seed."""
    groups = np.concatenate([np.full(rows, g) for g, (_, _, _, rows, _) in enumerate(MIXED)])
    groups = groups[np.random.default_rng(5).permutation(len(groups))]
    settings = [{**dict(temperature=SMALL_T, top_k=0, top_p=1.0, min_p=0.0), **s} for _, _, s, _, _ in MIXED]
    per_row = {key: torch.tensor([settings[g][key] for g in groups]) for key in settings[0]}
    logits = torch.tensor(np.stack([MIXED[g][1] for g in groups]), dtype=torch.float32)
    seeds = torch.arange(len(groups), dtype=torch.int64) * 7919 + 3
    tokens, logprobs = sample(logits, generator=seeds, backend="triton", **per_row)
    _check_logprobs(logits, per_row["temperature"], tokens, logprobs)
    return groups, settings, tokens


@pytest.mark.parametrize("group", range(len(MIXED)), ids=[m[0] for m in MIXED])
def test_filtered_rows_have_stated_power(mixed_launch, group):
    """False alarm <= 1e-4 each. Power: top-k: 1.0 (k - 1), 0.99992 (k + 1), top-p (alone, and after
    top-k 4 on the same design): 1.0 (0.97 target), 0.99996 (1.03 target), 1.0 (race without T);
    min-p: 0.999998 (halved); greedy: 0.99999994 (sampled instead)."""
    groups, settings, tokens = mixed_launch
    _, logits, _, rows, bug_settings = MIXED[group]
    s = settings[group]
    test = CountTest(exact_distribution(logits, **s), rows)
    bugs = {name: exact_distribution(logits, **{**s, **b}) for name, b in bug_settings.items()}
    if "top-p" in MIXED[group][0]:
        bugs["race without T"] = _without_temperature_in_race(logits, **s)
    _assert_stated(test, bugs)
    why = test.rejection(tokens[torch.tensor(groups == group)].numpy())
    assert why is None, why


def test_mixed_rows_have_stated_power(mixed_launch):
    """Each design's rows against the bug "rows read other rows' settings", in the form that changes
    every design: sampled rows with the greedy rows' settings, greedy rows with a sampled design's.
    False alarm 5 x 1e-4 / 5; power >= 0.99997 against each (greedy rows with sampled settings: 0.99997)."""
    groups, settings, tokens = mixed_launch
    greedy = [m[0] for m in MIXED].index("greedy")
    for g, (name, logits, _, rows, _) in enumerate(MIXED):
        test = CountTest(exact_distribution(logits, **settings[g]), rows, alpha=1e-4 / len(MIXED))
        swaps = {f"{name} with {MIXED[o][0]}'s settings": exact_distribution(logits, **settings[o])
                 for o in range(len(MIXED)) if o != g and greedy in (g, o)}
        powers = {k: test.power(p1) for k, p1 in swaps.items()}
        assert min(powers.values()) >= 0.999, powers
        why = test.rejection(tokens[torch.tensor(groups == g)].numpy())
        assert why is None, why


SPLIT_CASES = [(MIN_P, dict(temperature=SMALL_T, min_p=0.3), 8192, dict(min_p=0.15)),
               (TOP_K, dict(temperature=SMALL_T, top_k=3, top_p=0.9), 2, dict(top_k=2))]


@pytest.mark.parametrize("case", range(len(SPLIT_CASES)), ids=["min-p", "top-k+top-p"])
def test_split_rows_have_stated_power(monkeypatch, case):
    """48 rows split over 2 programs (MIN_CHUNK 16, V = 32): min-p rows with the whole row in the
    buffer (cap 8192), top-k + top-p rows through pivot passes and the race kernel (cap 2). False
    alarm <= 1e-4 each; power >= 0.999 against a chunk lost in a merge (either chunk) and min-p halved
    / top-k - 1. B = 1 draws equal the same rows' draws inside the batch."""
    logits_np, s, cap, bug = SPLIT_CASES[case]
    rows = 48
    monkeypatch.setattr(sampling_triton, "MIN_CHUNK", 16)
    monkeypatch.setattr(sampling_triton, "COMPACT_CAP", cap)
    assert sampling_triton.split_plan(32)[0] == 2
    for i in (case,):
        p0 = exact_distribution(logits_np, **s)
        test = CountTest(p0, rows)
        bugs = {"filter bug": exact_distribution(logits_np, **{**s, **bug})}
        for chunk in (0, 1):
            lost = p0.copy()
            lost[chunk * 16:(chunk + 1) * 16] = 0
            bugs[f"chunk {chunk} lost"] = lost / lost.sum()
        _assert_stated(test, bugs)
        logits = torch.tensor(logits_np, dtype=torch.float32).expand(rows, -1).contiguous()
        seeds = torch.arange(rows, dtype=torch.int64) * 1000003 + 17 + i
        tokens, logprobs = sample(logits, generator=seeds, backend="triton", **s)
        why = test.rejection(tokens.numpy())
        assert why is None, why
        _check_logprobs(logits, torch.full((rows,), s["temperature"]), tokens, logprobs)
        row = 29
        alone, _ = sample(logits[row:row + 1], generator=seeds[row:row + 1], backend="triton", **s)
        assert alone.item() == tokens[row].item()


def test_false_alarm_rates_hold():
    """The chi-square limit behind each stated false-alarm rate, checked by simulating the rule on
    200,000 multinomial samples of each design (numpy): at most 2.5e-4 observed (1e-4 stated; the
    mean of 20 rejections has a standard deviation of ~4.5)."""
    designs = [CountTest(exact_distribution(TEMP_LOGITS, TEMP_T), TEMP_ROWS)]
    designs += [CountTest(exact_distribution(lg, **dict(temperature=SMALL_T, **s)), rows)
                for _, lg, s, rows, _ in MIXED if "temperature" not in s]
    for seed, test in enumerate(designs):
        assert test.simulated_false_alarm(200_000, seed) <= 2.5e-4


def _key(x: torch.Tensor) -> torch.Tensor:
    """The kernel's order-preserving int key of float32 logits (-0.0 counted as +0.0)."""
    bits = torch.where(x == 0, 0.0, x).float().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -1 - bits, bits + 2**31)


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
