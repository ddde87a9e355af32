"""odpo's web app and command line: the Gradio UI, the services behind it, and the `odpo` CLI."""
