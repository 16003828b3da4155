"""One trainer per stage, thin: loop, Accelerate, logging, checkpointing. The math is in `losses`."""
