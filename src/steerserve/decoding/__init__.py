"""The generation engine: model loading, KV cache, batching, sampling, detokenization."""
