"""The edge partition: embeddings, the first decoder layers and the early-exit heads."""
