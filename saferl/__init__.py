"""SafeRL: safety reinforcement learning against a Qwen3Guard-style guard. Version only; no import side effects."""

__version__ = "0.1.0"
