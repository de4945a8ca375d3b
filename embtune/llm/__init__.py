"""The LLM client (any OpenAI-compatible endpoint, with cache, retries and cost) and the embedded local model."""
