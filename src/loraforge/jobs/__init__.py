"""Files and fine-tuning jobs: the service behind the OpenAI-compatible API, and the worker that runs jobs."""
