"""WebDataset DataModules: text-image pairs (img2dataset layout) and unlabeled video (video2dataset layout)."""
