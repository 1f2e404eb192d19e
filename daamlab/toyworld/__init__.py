"""The toy urban world: procedural scenes with exact labels, and the small model trained on them."""
