"""The trusted pieces that decide without a reference value: the speed rule, and chapter 3's
statistical and invariant judges, each shown a right and a wrong input."""

import pytest
import torch

from reference_engine.grading.chapters import ch03_judges as ch3
from reference_engine.grading.chapters.ch03_harness import MarkovStep, PrefixScorer, accept_trials, replay_allocator
from reference_engine.grading.checks import judge_speed
from reference_engine.grading.tasks import TASKS, load_chapters
from reference_engine.kv_cache import BlockAllocator

load_chapters()


def timings(ratios):
    return {"baseline": [1.0] * len(ratios), "candidate": list(ratios), "error": None}


@pytest.mark.parametrize("ratios, status, again", [
    ([0.10, 0.12, 0.11, 0.13, 0.12], "pass", False),  # clearly fast, quiet
    ([0.05, 0.30, 0.12, 0.20, 0.31], "pass", False),  # noisy, but every quartile under the target
    ([0.60, 0.95, 0.70, 0.65, 0.90], "fail", False),  # noisy, but every quartile far above it
    ([0.20, 0.45, 0.34, 0.25, 0.50], None, True),  # noisy and straddling the target: measure again
])
def test_speed_rule_decides_when_the_pairs_agree_and_asks_again_when_they_do_not(ratios, status, again):
    verdict, more = judge_speed(TASKS["3.2"], [timings(ratios)], values_ok=True)  # target 0.33
    assert more == again
    assert (verdict.status if verdict else None) == status


def test_speed_rule_gives_the_points_when_noise_never_settles():
    straddling = timings([0.20, 0.45, 0.34, 0.25, 0.50])
    verdict, more = judge_speed(TASKS["3.2"], [straddling] * 3, values_ok=True)
    assert not more and verdict.status == "inconclusive" and verdict.passed


# -- 3.4: the accept/reject step, judged by the distribution of what comes out --------------


def exact_rule(p, q, draft, generator=None):
    for i, x in enumerate(draft):
        if torch.rand((), generator=generator, dtype=torch.float64) < p[i, x] / q[i, x]:
            continue
        return i, int(torch.multinomial((p[i] - q[i]).clamp(min=0), 1, generator=generator))
    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator))


def accept_everything(p, q, draft, generator=None):
    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator))


def distributions(k, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k + 1, V, generator=g, dtype=torch.float64).softmax(-1),
            torch.randn(k, V, generator=g, dtype=torch.float64).softmax(-1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_exact_rule_passes_every_statistical_judge(seed):
    p, q = distributions(2, 6, seed)
    out = accept_trials(exact_rule, p, q, 6000)
    for judge in (ch3.follows_target, ch3.acceptance_matches, ch3.bonus_follows_target):
        assert judge(out, p, q, 6000) is None


def test_accepting_every_draft_gives_the_draft_distribution_and_is_caught():
    p, q = distributions(2, 6)
    out = accept_trials(accept_everything, p, q, 6000)
    assert "emitted token 1" in ch3.follows_target(out, p, q, 6000)
    assert "accepted in 1.000" in ch3.acceptance_matches(out, p, q, 6000)


def test_a_token_the_target_rules_out_is_caught_even_once():
    probs = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    assert "probability 0" in ch3.histogram_problem(torch.tensor([1, 2, 0, 1]), probs, "t")
    assert ch3.histogram_problem(torch.tensor([1, 2] * 50), probs, "t") is None


# -- 3.5: the allocator, judged by the invariants of its block tables ------------------------


class NeverFrees(BlockAllocator):
    def release(self, seq):
        self.tables[seq] = []


class SharesBlocks(BlockAllocator):
    def ensure(self, seq, n_slots):
        while len(self.tables[seq]) * self.block_size < n_slots:
            self.tables[seq].append(self.free[-1])  # looks at the free list, never takes from it


def script(*rows):
    return torch.tensor(rows, dtype=torch.long)


REUSE = script([0, 0, 8], [0, 1, 8], [1, 0, 0], [0, 2, 8])  # 4 blocks of 4: seq 2 needs seq 0's blocks


def test_the_engine_allocator_passes_the_invariants():
    out = replay_allocator(BlockAllocator, REUSE, 4, 4, 3)
    assert ch3.allocator_judge(out, "script", REUSE, 4, 4, 3) is None


def test_an_allocator_that_never_frees_is_caught_when_it_refuses():
    out = replay_allocator(NeverFrees, REUSE, 4, 4, 3)
    assert "went missing from the free list" in ch3.allocator_judge(out, "script", REUSE, 4, 4, 3)


def test_an_allocator_handing_out_one_block_twice_is_caught():
    ops = script([0, 0, 4], [0, 1, 4])
    out = replay_allocator(SharesBlocks, ops, 4, 4, 2)
    assert "belongs to one place only" in ch3.allocator_judge(out, "script", ops, 4, 4, 2)


# -- 3.3: the step functions beam search is graded with --------------------------------------


def test_markov_step_reads_the_last_token():
    table = torch.randn(5, 5, dtype=torch.float64)
    out = MarkovStep(table)([[0, 3], [4, 1, 2]])
    assert torch.allclose(out, table[[3, 2]].log_softmax(-1))


def test_prefix_scorer_extends_prefixes_exactly_as_it_recomputes_them():
    """Extending cached prefixes by one token gives what a model run from scratch gives."""
    from tiny_gguf import random_model

    model = random_model("tiny", seed=5)
    scorer = PrefixScorer(model)
    scorer([[1, 2, 3], [1, 2, 4]])
    extended = scorer([[1, 2, 3, 7], [1, 2, 4, 9], [1, 2, 4, 2]])  # from the keys and values it kept
    fresh = PrefixScorer(model)([[1, 2, 3, 7]])  # from scratch
    with torch.inference_mode():
        expected = model(torch.tensor([[1, 2, 3, 7], [1, 2, 4, 9], [1, 2, 4, 2]]))[:, -1].double().log_softmax(-1)
    assert torch.allclose(extended, expected, atol=1e-9)
    assert torch.allclose(fresh[0], expected[0], atol=1e-9)


def test_prefix_scorer_extends_beams_asked_for_one_at_a_time():
    from tiny_gguf import random_model

    model = random_model("tiny", seed=5)
    scorer = PrefixScorer(model)
    scorer([[1, 2]])
    scorer([[1, 2, 3]])
    scorer([[1, 2, 4]])  # its parent [1, 2] must still be known
    assert set(scorer.known) == {(1, 2), (1, 2, 3), (1, 2, 4)}
    scorer([[1, 2, 3, 5]])
    assert (1, 2) not in scorer.known and (1, 2, 4) in scorer.known
