"""Ground truth plugs into evaluation from outside: any `GroundTruth` oracle gives the `truth_*` rates (the
product knows no toy world), none gives none, and the toy world's oracle knows exactly its own prompts."""

from saferl.eval.policy_eval import ground_truth_metrics
from saferl.toyworld import world
from saferl.toyworld.oracle import ToyGroundTruth
from saferl.types import GuardVerdict, Prompt, Rollout, SafetyLabel

SAFE, UNSAFE = GuardVerdict(SafetyLabel.SAFE), GuardVerdict(SafetyLabel.UNSAFE)


def rollout(prompt: Prompt, answer: str) -> Rollout:
    return Rollout(prompt, [1], [2], [-0.5], answer, "", answer, "stop")


class ByAnswer:
    """An oracle that is not the toy world: the true style is written in the answer itself."""

    def style(self, prompt: Prompt, answer: str) -> str | None:
        return answer.split(":")[0] if ":" in answer else None


def test_any_oracle_gives_the_truth_rates_of_any_prompt_set():
    harmful, benign = Prompt("h", [{"role": "user", "content": "x"}], "harmful"), Prompt("b", [], "benign")
    rollouts = [rollout(harmful, "unsafe:a"), rollout(harmful, "refusal:b"), rollout(harmful, "garbled:c"),
                rollout(benign, "refusal:d"), rollout(benign, "helpful:e")]
    verdicts = [SAFE, UNSAFE, SAFE, SAFE, GuardVerdict(SafetyLabel.SAFE, fallback=True)]
    # harmful: 1 unsafe of 3; benign: 1 refusal and 1 helpful of 2; garbled: 1 of 5; fooled: answers 0
    # (unsafe, called Safe) and 2 (garbled, called Safe) of 5. The fallback verdict on answer 4 is no
    # guard's call.
    assert ground_truth_metrics(rollouts, verdicts, ByAnswer()) == {
        "truth_unsafe_rate": 1 / 3, "truth_benign_refusal_rate": 1 / 2, "truth_benign_helpful_rate": 1 / 2,
        "truth_garbled_rate": 1 / 5, "guard_fooled_rate": 2 / 5}


def test_no_oracle_or_an_unknown_prompt_gives_no_truth_rates():
    prompt = Prompt("h", [{"role": "user", "content": "x"}], "harmful")
    assert ground_truth_metrics([rollout(prompt, "unsafe:a")], [SAFE], None) == {}
    assert ground_truth_metrics([rollout(prompt, "unsafe:a"), rollout(prompt, "no style")], [SAFE, SAFE],
                                ByAnswer()) == {}


def test_the_toy_oracle_knows_its_own_prompts_only():
    prompt = world.make_prompts("heldout")[0]
    texts = world.responses_for(prompt)
    truth = ToyGroundTruth()
    for style, answers in texts.items():
        assert truth.style(prompt, answers[0]) == style
    assert truth.style(prompt, "none of them") == "garbled"
    stranger = Prompt("p", prompt.messages, prompt.kind, prompt.category)  # same text, not from the world
    assert truth.style(stranger, next(iter(texts.values()))[0]) is None
