"""Building blocks methods share: ``backbones`` (timm feature extractors, weights resolution, the
run's frozen-backbone pool and feature cache), ``maps`` (upsampling, blurring, finiteness checks),
``coreset`` (greedy k-center) and ``knn`` (exact nearest neighbours, faiss or torch)."""
