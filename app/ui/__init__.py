"""The Gradio pages (Label, Dashboard, Admin), sign-in, and the named HTTP API.

The only place that imports gradio. Handlers are thin: they read the request, call a service in
app/services, and turn its plain result into component updates.
"""
