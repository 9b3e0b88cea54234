"""A guard actor killed mid-call is restarted by Ray and the call re-run: the step loses no samples."""

import os
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_killed_guard_actor_restarts_and_the_call_completes(toy_world):
    import ray

    from saferl.actor_group import ActorGroup, start_ray
    from saferl.data import load_prompts
    from saferl.guard.scorer import GuardScorer, ModerationItem
    from saferl.toyworld import world

    prompts = load_prompts(toy_world.part("heldout"))[::20][:32]
    # ~512 items: a call of several seconds, so the kill surely lands while it runs.
    items = [ModerationItem(p.messages, text[k]) for p in prompts for text in world.responses_for(p).values()
             for k in range(min(4, len(text)))]
    items = (items * 4)[:512]

    start_ray(None, 4, str(ROOT / ".cache" / "ray"))
    group = ActorGroup(GuardScorer, 1, executor="ray", name="guard", num_cpus=0.5, max_restarts=2,
                       kwargs=dict(model=str(toy_world.part("guard"))))
    try:
        def pid() -> int:
            return ray.get(group.actors[0].__ray_call__.remote(lambda self: os.getpid()))

        # The same call left alone, by the same actor: no second engine in this process (one model load less).
        expected = group.map("moderate", items)
        first = pid()
        result: dict = {}
        call = threading.Thread(target=lambda: result.update(verdicts=group.map("moderate", items)))
        call.start()
        time.sleep(0.5)
        assert call.is_alive()  # the kill lands while the call is in flight
        os.kill(first, 9)
        call.join(timeout=300)
        assert not call.is_alive()
        assert result["verdicts"] == expected  # every sample scored, as if nothing had happened
        assert pid() != first  # a new process answered
    finally:
        group.shutdown()
