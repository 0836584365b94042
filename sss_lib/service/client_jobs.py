"""The training-job methods of :class:`sss_lib.service.client.ServiceClient` (placeholder until the
jobs part lands; see docs/service_api.md). Torch-free, Python 3.9."""

from __future__ import annotations


class JobsClientMixin:
    """Job methods; they call ``self._request(...)`` and ``self._stream_lines(...)`` of ServiceClient."""
