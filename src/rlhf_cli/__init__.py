"""rlhf-cli: Reinforcement Learning from Human Feedback as one command."""

__version__ = "0.1.0"
