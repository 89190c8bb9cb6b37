"""Loading a model as its plan says, and generating from it (engine, lean forward, sampling)."""
