"""The HTTP worker: front doors, admission, the request pipeline, answers."""
