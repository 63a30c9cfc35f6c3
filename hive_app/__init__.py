"""The web app: Gradio UI and API (`ui`), the service it calls (`service`), sessions (`auth`),
background jobs (`jobs`), the ranking queue (`queue`), the dashboard (`dashboard`)."""
