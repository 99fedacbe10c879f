"""The Gradio app: ``handlers`` (logic over core, no gradio), ``plots`` (figures), ``ui`` (layout and wiring)."""
