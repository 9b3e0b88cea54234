"""Model and data references: the one place a `toyworld:<part>` reference becomes a local path.

Every command (train, eval, serve, guard moderate / eval / train-stream, chat) resolves its references here,
in the CLI or the driver, and hands plain paths (or hub ids) to the product code, so `saferl.guard`,
`saferl.eval`, `saferl.trainer`, `saferl.rollout` and `rewards` never import the toy world. Parts: the
world's own (policy, guard, reward_model, train, heldout), its judge and further RMs (judge, reward_model_1,
reward_model_2: built on first use) and its Stream guard (stream_guard, stream_heldout). Anything that does not start with `toyworld:` is returned unchanged.
"""

from __future__ import annotations

from saferl.config import ToyWorldConfig

PREFIX = "toyworld:"


def resolve_reference(ref: str, toyworld: ToyWorldConfig | None = None, *, build: bool = True) -> str:
    """`ref` as a local path when it is `toyworld:<part>` (of the world `toyworld`, default: the schema's),
    building what the cache lacks; `build=False` (the dry-run plan) only says where the part would be.
    ValueError naming the part for an unknown one."""
    if not ref.startswith(PREFIX):
        return ref
    from saferl.toyworld.build import PARTS as WORLD_PARTS
    from saferl.toyworld.build import ensure_built, ensure_part, toyworld_paths

    part = ref[len(PREFIX):]
    cfg = toyworld or ToyWorldConfig()
    if part in WORLD_PARTS:
        return str(ensure_part(cfg, part) if build else toyworld_paths(cfg).part(part))
    from saferl.toyworld.stream import PARTS as STREAM_PARTS  # torch and transformers: only when needed
    from saferl.toyworld.stream import ensure_toy_stream, toy_stream_paths

    if part not in STREAM_PARTS:
        raise ValueError(f"unknown toy world part {part!r} in {ref!r}; expected one of "
                         f"{WORLD_PARTS + STREAM_PARTS}")
    root = (ensure_built(cfg, stream_guard=True) if build else toyworld_paths(cfg)).root
    stream = ensure_toy_stream(root) if build else toy_stream_paths(root)
    return str(stream.guard if part == "stream_guard" else stream.heldout)
