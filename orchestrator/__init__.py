"""The orchestrator: pipeline, stage clients, video I/O, paste-back, public API and CLI."""
