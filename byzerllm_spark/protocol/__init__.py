"""The wire contracts every caller and the server share: the request model, Arrow bodies, SSE events.

This layer imports nothing of the package but :mod:`..errors` and :mod:`..settings`.
"""
