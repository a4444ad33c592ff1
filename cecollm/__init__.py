"""cecollm: one decoder LLM split between an edge device and a cloud server (CE-CoLLM)."""

__version__ = "0.1.0"
