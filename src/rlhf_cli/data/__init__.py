"""Data layer: sources (synthetic, local, hub) -> formatters -> tokenization. No training logic."""
