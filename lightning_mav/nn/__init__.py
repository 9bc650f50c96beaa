"""The paper's networks as plain ``nn.Module``s (no Lightning here)."""
