"""Bad input for `tuneforge export` (issue 19 format): each a one-line error, exit 2, nothing written."""

_CONFIG = "model: {name: /nonexistent/base}\nmethod: {name: lora}\n"
_MANIFEST = '{"base_model": {"name": "/nonexistent/base", "dir": "/nonexistent/base"}}'
_LORA = '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}'

ROWS = [
    {
        "id": "export-not-a-run",
        "argv": ["export", "{tmp}/nothing", "--format", "merged"],
        "exit": 2,
        "stderr": "not a tuneforge run directory",
    },
    {
        "id": "export-no-adapter-or-model",
        "argv": ["export", "{tmp}/run", "--format", "merged"],
        "files": {"run/config.yaml": _CONFIG, "run/manifest.json": _MANIFEST},
        "exit": 2,
        "stderr": "neither adapter/ nor model/ found",
    },
    {
        "id": "export-truncated-adapter",
        "argv": ["export", "{tmp}/run", "--format", "gguf"],
        "files": {
            "run/config.yaml": _CONFIG,
            "run/manifest.json": _MANIFEST,
            "run/adapter/adapter_config.json": _LORA,
            "run/adapter/adapter_model.safetensors": b'\x40\x00\x00\x00\x00\x00\x00\x00{"a":',
        },
        "exit": 2,
        "stderr": "corrupt or truncated",
    },
    {
        "id": "export-pickled-adapter",
        "argv": ["export", "{tmp}/run", "--format", "merged"],
        "files": {
            "run/config.yaml": _CONFIG,
            "run/manifest.json": _MANIFEST,
            "run/adapter/adapter_config.json": _LORA,
            "run/adapter/adapter_model.bin": b"not unpickled",
        },
        "exit": 2,
        "stderr": "pickled adapters (.bin) are refused",
    },
    {
        "id": "export-prefix-not-mergeable",
        "argv": ["export", "{tmp}/run", "--format", "gguf"],
        "files": {
            "run/config.yaml": "model: {name: /nonexistent/base}\nmethod: {name: prefix}\n",
            "run/manifest.json": _MANIFEST,
            "run/adapter/adapter_config.json": '{"peft_type": "PREFIX_TUNING"}',
        },
        "exit": 2,
        "stderr": "method prefix",
    },
    {
        "id": "export-unsupported-architecture",
        "argv": ["export", "{tmp}/run", "--format", "gguf"],
        "files": {
            "run/config.yaml": "model: {name: /nonexistent/base}\nmethod: {name: full}\n",
            "run/manifest.json": _MANIFEST,
            "run/model/config.json": '{"architectures": ["MambaForCausalLM"], "vocab_size": 8}',
            "run/tokenizer/tokenizer_config.json": "{}",
        },
        "exit": 2,
        "stderr": "MambaForCausalLM cannot be written as GGUF",
    },
    {
        "id": "export-unknown-quant",
        "argv": ["export", "{run}", "--format", "gguf", "--quant", "q9_x"],
        "exit": 2,
        "stderr": "--quant",
    },
    {
        "id": "export-quant-with-merged",
        "argv": ["export", "{run}", "--format", "merged", "--quant", "q8_0", "--out", "{tmp}/o"],
        "exit": 2,
        "stderr": "--quant applies to --format gguf only",
    },
    {
        "id": "export-bad-max-regression",
        "argv": ["export", "{run}", "--format", "merged", "--max-regression", "bleu=x"],
        "exit": 2,
        "stderr": "--max-regression",
    },
    {
        "id": "export-existing-out",
        "argv": [
            "export",
            "{run}",
            "--format",
            "merged",
            "--out",
            "{tmp}/out",
            "--data",
            "{tmp}/d.jsonl",
        ],
        "files": {
            "out/keep.txt": "mine",
            "d.jsonl": '{"messages": [{"role": "user", "content": "hi"}, '
            '{"role": "assistant", "content": "yes"}]}\n',
        },
        "exit": 2,
        "stderr": "already exists",
    },
]
