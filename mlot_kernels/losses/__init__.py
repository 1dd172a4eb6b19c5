"""The losses over a batch of answers: MultiLevelOT, ULD, the student's cross-entropy, and how
they read a model's outputs and labels."""
