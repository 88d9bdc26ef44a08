"""The web UI (:mod:`.ui`, ``retouch ui``): Gradio tabs over the library's recipes."""
