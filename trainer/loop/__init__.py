"""The training loop and its pure maths (timesteps, noise, loss weighting, LR schedules)."""
