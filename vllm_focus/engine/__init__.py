"""The masked-diffusion engine inside vLLM: config hook, scheduler, worker/runner, decoder."""
