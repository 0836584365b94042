"""The SSS service: inference and training in their own process (see docs/service_api.md).

Nothing is imported here: the client side (``client``, ``client_jobs``, ``local``, ``protocol``)
must load without torch, fastapi or uvicorn.
"""
