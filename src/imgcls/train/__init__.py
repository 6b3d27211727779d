"""Training: one explicit loop (train_one_epoch / evaluate), optimiser + schedule, checkpoints."""
