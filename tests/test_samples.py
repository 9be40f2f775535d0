"""samples.jsonl picks: one trajectory per problem first, as many as train.log_samples."""
from types import SimpleNamespace

from cir.rl.logger import pick_samples


def trajs(groups: int, n: int) -> list:
    return [SimpleNamespace(prompt_index=g, sample_index=j) for g in range(groups) for j in range(n)]


def test_distinct_problems_first():
    picked = pick_samples(trajs(groups=3, n=4), 2)  # prompt-major order: the first two are both problem 0's
    assert [(t.prompt_index, t.sample_index) for t in picked] == [(0, 0), (1, 0)]
    picked = pick_samples(trajs(groups=3, n=4), 3)
    assert sorted(t.prompt_index for t in picked) == [0, 1, 2]


def test_more_samples_than_problems_fills_up_with_second_samples():
    picked = pick_samples(trajs(groups=2, n=3), 5)
    assert [(t.prompt_index, t.sample_index) for t in picked] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]
    assert pick_samples(trajs(groups=2, n=2), 10) and len(pick_samples(trajs(groups=2, n=2), 10)) == 4
    assert pick_samples(trajs(groups=2, n=2), 0) == []
