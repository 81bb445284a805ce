"""Built-in demo model: procedural data, pretraining, the example concept and concept scores."""
