"""KV transfer between engines (P->D handoff, live-migration stages).

- ``kv_payload``: the backend-neutral payload of ``KVBlocks`` for vLLM engines (whole blocks, numpy per layer),
  merging stage copies, and the wire form for vLLM's IPC. Needs only numpy.
- ``vllm_connector``: llmsched's vLLM KV connector (``LlmschedConnector``), its worker extension and EngineCore
  utilities. Imports vLLM; loaded by ``scheduler.engine.vllm_backend`` and by vLLM's own processes.
"""
