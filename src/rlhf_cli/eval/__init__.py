"""Evaluation: batched generation, ROUGE, gold score."""
