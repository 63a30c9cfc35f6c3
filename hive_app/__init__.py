"""The web app: Gradio UI and API (`ui`), the service it calls (`service`), sessions (`auth`),
background jobs (`jobs`), the ranking queue (`queue`), the dashboard (`dashboard`)."""

import os

# Gradio reads this when it is imported: no usage analytics and no version check, from any entry point.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
