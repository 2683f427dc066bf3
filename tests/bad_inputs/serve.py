"""Bad-input rows for `tuneforge serve` (the shared row format of issue 19).

Plain data; the bad-input runner executes and judges them. Every row fails before a model loads
(except the foreign-base adapter, refused after the fingerprint check) and binds no port.
"""

GGUF_HEAD = b"GGUF" + bytes(60)

ROWS = [
    {
        "id": "serve-model-missing",
        "argv": ["serve", "{tmp}/nope"],
        "exit": 2,
        "stderr": "{tmp}/nope: no such run dir, export dir or .gguf file",
    },
    {
        "id": "serve-port-out-of-range",
        "argv": ["serve", "{model}", "--port", "70000"],
        "exit": 2,
        "stderr": "--port: 70000 is not between 1 and 65535",
    },
    {
        "id": "serve-port-not-a-number",
        "argv": ["serve", "{model}", "--port", "http"],
        "exit": 2,
        "stderr": "--port",
    },
    {
        "id": "serve-max-batch-zero",
        "argv": ["serve", "{model}", "--max-batch", "0"],
        "exit": 2,
        "stderr": "--max-batch: 0 is not between 1 and 256",
    },
    {
        "id": "serve-max-batch-tokens-negative",
        "argv": ["serve", "{model}", "--max-batch-tokens", "-5"],
        "exit": 2,
        "stderr": "--max-batch-tokens: -5 is not between",
    },
    {
        "id": "serve-max-queue-negative",
        "argv": ["serve", "{model}", "--max-queue", "-1"],
        "exit": 2,
        "stderr": "--max-queue: -1 is not between",
    },
    {
        "id": "serve-timeout-zero",
        "argv": ["serve", "{model}", "--timeout", "0"],
        "exit": 2,
        "stderr": "--timeout: 0.0 must be a positive number of seconds",
    },
    {
        "id": "serve-adapter-without-name",
        "argv": ["serve", "{model}", "--adapter", "{run}"],
        "exit": 2,
        "stderr": "expected NAME=RUN_DIR",
    },
    {
        "id": "serve-adapter-bad-name",
        "argv": ["serve", "{model}", "--adapter", "../x={run}"],
        "exit": 2,
        "stderr": "NAME must be 1-64 of",
    },
    {
        "id": "serve-adapter-name-twice",
        "argv": ["serve", "{model}", "--adapter", "a={run}", "--adapter", "a={run}"],
        "exit": 2,
        "stderr": "--adapter a: the name is given twice",
    },
    {
        "id": "serve-adapter-not-a-run",
        "argv": ["serve", "{model}", "--adapter", "a={tmp}/d"],
        "files": {"d/notes.txt": "hello\n"},
        "exit": 2,
        "stderr": "--adapter a={tmp}/d: {tmp}/d is not a tuneforge run directory",
    },
    {
        "id": "serve-adapter-weights-missing",
        "argv": ["serve", "{model}", "--adapter", "a={tmp}/r"],
        "setup": [("copy", "{run}", "r"), ("remove", "r/adapter/adapter_model.safetensors")],
        "exit": 2,
        "stderr": "has no adapter_model.safetensors",
    },
    {
        "id": "serve-adapter-other-base",
        "argv": ["serve", "{model_wide}", "--adapter", "a={run}"],
        "exit": 2,
        "stderr": "whose weights differ from the served base",
    },
    {
        "id": "serve-key-file-missing",
        "argv": ["serve", "{model}", "--api-key-file", "{tmp}/keys"],
        "exit": 2,
        "stderr": "--api-key-file: cannot read {tmp}/keys",
    },
    {
        "id": "serve-key-file-empty",
        "argv": ["serve", "{model}", "--api-key-file", "{tmp}/keys"],
        "files": {"keys": "# nobody yet\n"},
        "exit": 2,
        "stderr": "--api-key-file: {tmp}/keys holds no key",
    },
    {
        "id": "serve-key-too-short",
        "argv": ["serve", "{model}", "--api-key-file", "{tmp}/keys"],
        "files": {"keys": "abc\n"},
        "exit": 2,
        "stderr": "{tmp}/keys:1: a key needs at least 16 characters",
    },
    {
        "id": "serve-key-bad-hash",
        "argv": ["serve", "{model}", "--api-key-file", "{tmp}/keys"],
        "files": {"keys": "sha256:xyz\n"},
        "exit": 2,
        "stderr": "{tmp}/keys:1: sha256: needs 64 hex digits",
    },
    {
        "id": "serve-key-file-binary",
        "argv": ["serve", "{model}", "--api-key-file", "{tmp}/keys"],
        "files": {"keys": b"\xff\xfe\x00key"},
        "exit": 2,
        "stderr": "--api-key-file: cannot read {tmp}/keys",
    },
    {
        "id": "serve-gguf-bad-magic",
        "argv": ["serve", "{tmp}/m.gguf"],
        "files": {"m.gguf": b"NOTGGUF" + bytes(57)},
        "exit": 2,
        "stderr": "{tmp}/m.gguf: not a GGUF file",
    },
    {
        "id": "serve-gguf-truncated",
        "argv": ["serve", "{tmp}/m.gguf"],
        "files": {"m.gguf": GGUF_HEAD},
        "exit": 2,
        "stderr": "{tmp}/m.gguf: llama.cpp cannot load it",
    },
    {
        "id": "serve-gguf-with-adapter",
        "argv": ["serve", "{tmp}/m.gguf", "--adapter", "a={run}"],
        "files": {"m.gguf": GGUF_HEAD},
        "exit": 2,
        "stderr": "--adapter: the llama.cpp engine serves one GGUF file",
    },
    {
        "id": "serve-export-dir-two-ggufs",
        "argv": ["serve", "{tmp}/exp"],
        "files": {"exp/a-q4_k_m.gguf": GGUF_HEAD, "exp/a-q8_0.gguf": GGUF_HEAD},
        "exit": 2,
        "stderr": "holds several GGUF files (a-q4_k_m.gguf, a-q8_0.gguf)",
    },
    {
        "id": "serve-llamacpp-engine-on-hf-dir",
        "argv": ["serve", "{model}", "--engine", "llama.cpp"],
        "exit": 2,
        "stderr": "--engine llama.cpp: ",
    },
    {
        "id": "serve-vllm-engine",
        "argv": ["serve", "{model}", "--engine", "vllm"],
        "exit": 2,
        "stderr": "--engine vllm: not built",
    },
]
