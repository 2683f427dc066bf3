"""Serve a run or an export over HTTP in OpenAI's wire format: app, engines, auth, limits, metrics.

`app.create_app` wires the pieces; `cli/serve.py` reads the command line; the feedback store
plugs in as a `records.RecordSink` and an extra router.
"""
