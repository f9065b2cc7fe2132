"""Perceptual losses on the predicted image: DINO embeddings and LPIPS, frozen networks."""
