"""The model hop between HTTP workers and model processes: wire format, client, server."""
