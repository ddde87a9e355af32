"""What the pages, the HTTP API and the CLI do, as plain Python: labeling, admin, prompt import,
status. No click and no gradio here; each service owns its database transactions."""
