"""The OpenAI-compatible HTTP server (`loraplex serve`).

    api_server            build_app (the FastAPI routes) and run_server (engine + uvicorn)
    protocol              request bodies: OpenAI's fields and vLLM's extras
    serving_models        what `model` names, /v1/models, runtime adapter loading and unloading
    serving_completion    /v1/completions
    serving_chat          /v1/chat/completions
    serving_tokenization  /tokenize, /detokenize
    serving_engine        what completions and chat share: token budget, sampling, usage, SSE
    generation            one HTTP request's engine requests: priming, merging, metrics, aborts
    logprobs              log-probabilities in OpenAI's two shapes
    errors                OpenAI's error shape and the status of each error
    auth                  --api-key
    metrics               /metrics (Prometheus)
"""
