"""sam2-stream's network side: WebSocket protocol and server, WebRTC, operator page.

Imports flow one way: ``server`` uses ``tracker``, never the reverse."""
