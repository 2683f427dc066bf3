"""Broken input for `tuneforge ui`: each row fails before the page starts, with one line."""

ROWS = [
    {
        "id": "ui-port-zero",
        "argv": ["ui", "--port", "0", "--workspace", "{tmp}"],
        "exit": 2,
        "stderr": "--port 0: must be between 1 and 65535",
    },
    {
        "id": "ui-port-too-big",
        "argv": ["ui", "--port", "70000", "--workspace", "{tmp}"],
        "exit": 2,
        "stderr": "--port 70000",
    },
    {
        "id": "ui-port-not-a-number",
        "argv": ["ui", "--port", "http", "--workspace", "{tmp}"],
        "exit": 2,
        "stderr": "--port",
    },
    {
        "id": "ui-workspace-missing",
        "argv": ["ui", "--port", "7861", "--workspace", "{tmp}/no-such-dir"],
        "exit": 2,
        "stderr": "--workspace",
    },
    {
        "id": "ui-workspace-is-a-file",
        "argv": ["ui", "--port", "7861", "--workspace", "{tmp}/file.txt"],
        "files": {"file.txt": "not a directory\n"},
        "exit": 2,
        "stderr": "not a directory",
    },
    {
        "id": "ui-max-running-zero",
        "argv": ["ui", "--max-running", "0", "--workspace", "{tmp}"],
        "exit": 2,
        "stderr": "--max-running 0: must be at least 1",
    },
    {
        "id": "ui-host-not-an-address",
        "argv": ["ui", "--host", "no.such.host.invalid", "--port", "7861", "--workspace", "{tmp}"],
        "exit": 2,
        "stderr": "--host no.such.host.invalid",
    },
]
