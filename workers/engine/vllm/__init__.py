"""The vLLM engine: vLLM's AsyncLLM behind workers.engine.interface, so that
the queue, streaming, batches and usage above it are the llama.cpp worker's
own code. Importing a module here that needs vLLM works only in the vLLM
environment (`./run vllm`); workers.engine.vllm.settings does not need it."""
