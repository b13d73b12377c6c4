"""The engine: scheduler, KV block pool, model runner, sampler, detokenizer."""
