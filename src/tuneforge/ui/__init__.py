"""The web page: build a config, check its data, launch and watch runs, compare, export, chat.

`tuneforge ui` serves it (`app.create_app`); the work itself is the CLI's and the recipes'. This
module imports nothing, so that `python -m tuneforge.ui.worker` starts light.
"""
