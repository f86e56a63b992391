"""The vision core: photo bytes to answers. Decoding (one module), sandboxed decoder children, face detectors,
networks and model artifacts, the per-photo decision, and the batch callables Ray Data runs."""
