"""Export: what a finished run becomes for deployment, and the check of what each step cost.

merge (HF dir), gguf_write + quantize (llama.cpp files), nf4 (bitsandbytes), lora_gguf, modelfile,
recheck (quality and speed of every artefact); wiring them from a run's config is recipes/export.py.
"""
