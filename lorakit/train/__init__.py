"""Training workflows: data loading and tokenization, the demo task, the training loop."""
