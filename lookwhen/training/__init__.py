"""Training and running models over data: the engine, pre-training targets
and losses, teachers and their target cache, pre-training, fine-tuning,
evaluation and embedding collections."""
