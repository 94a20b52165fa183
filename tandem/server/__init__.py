"""The OpenAI-compatible HTTP layer: `build_app(EngineClient, ServerConfig)` and `tandem serve`.

Kept import-light: `tandem.server.api` pulls in FastAPI, `tandem.server.engine_client.AsyncEngine`
the engine (torch) only when constructed.
"""
