"""The toy world as ground truth for evaluation: the `saferl.types.GroundTruth` the CLI and driver hand in.

The product never imports the toy world; the commands and the driver hand `ToyGroundTruth` to the held-out
evaluation, which then adds its `truth_*` rates for prompts the world knows. It knows its own prompts by
their meta (the world's `group`), not by the reference they came from, so a toy prompt set read from a
path is recognised as well as `toyworld:heldout`.
"""

from __future__ import annotations

from saferl.toyworld import world
from saferl.types import Prompt


class ToyGroundTruth:
    """The true style of an answer to a toy-world prompt (`world.classify_response`) and its true helpfulness
    (the toy RM's regression target of that style, `world.helpfulness_target`); None for any other prompt
    (one without the world's `group` in its meta)."""

    def style(self, prompt: Prompt, answer: str) -> str | None:
        if "group" not in prompt.meta:
            return None
        return world.classify_response(prompt, answer)

    def helpfulness(self, prompt: Prompt, answer: str) -> float | None:
        style = self.style(prompt, answer)
        return None if style is None else world.helpfulness_target(style)
