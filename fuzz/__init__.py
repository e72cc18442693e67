"""Coverage-guided fuzzing of every decoder that reads bytes from the network (atheris)."""
