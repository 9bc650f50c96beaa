"""One LightningModule per network of the paper."""
