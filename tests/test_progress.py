"""Generation progress: shown for any batch size (one sequence too), counted in tokens, with a time
left estimate from the tokens to come (hand-computed cases)."""
import io

from engine_utils import ByteTokenizer, tiny_model

from cir.engine import Engine, EngineConfig, SamplingParams
from cir.engine.progress import GenerationProgress


def engine(show_progress: bool = False) -> Engine:
    return Engine(tiny_model(), ByteTokenizer(),
                  EngineConfig(block_size=16, num_kv_blocks=64, show_progress=show_progress))


def test_one_sequence_shows_progress_in_tokens():
    out = io.StringIO()
    progress = GenerationProgress("evaluate tiny", file=out, mininterval=0.0)
    e = engine()
    (traj,) = e.generate([[1, 2, 3]], SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True), n=1,
                         progress=progress)
    text = out.getvalue()
    assert "evaluate tiny: 0/1 seqs, 0 tok" in text  # drawn at the start, before any token
    assert "evaluate tiny: 1/1 seqs, 12 tok" in text and "tok/s" in text
    assert progress.num_tokens == e.stats["num_generated_tokens"] >= len(traj.response_ids) == 12
    assert progress.num_finished == 1 and progress.tokens_left() == 0


def test_the_engines_own_progress_goes_to_stderr_for_small_batches(capsys):
    engine(show_progress=True).generate([[5, 6]], SamplingParams(temperature=1.0, max_tokens=4), n=2)
    assert "rollout: " in capsys.readouterr().err
    engine(show_progress=False).generate([[5, 6]], SamplingParams(temperature=1.0, max_tokens=4), n=2)
    assert "rollout: " not in capsys.readouterr().err


def test_tokens_left_hand_computed():
    p = GenerationProgress(enabled=False)
    p.start(num_seqs=4, max_tokens=400)
    p.add_tokens(40)
    assert p.tokens_left() == 360  # nothing finished: the limits' remainder
    p.update(1, 4)  # one ended at 4 tokens; the 3 open ones hold 36 (12 each): taken to end at 24
    assert p.tokens_left() == 3 * 24 - 36
    p.add_tokens(110)
    p.update(1, 116)  # finished mean 60 > twice the open ones' 15 tokens: they are taken to end at 60
    assert p.tokens_left() == 2 * 60 - 30
    p.add_tokens(240)
    assert p.tokens_left() == 400 - 390  # never beyond the limits
    p.update(2)
    assert p.tokens_left() == 0
