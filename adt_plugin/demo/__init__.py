"""`adt demo`: ADT and its baselines on a small class-conditional diffusion model of
scikit-learn's digits, through the same core code as the Stable Diffusion path."""
