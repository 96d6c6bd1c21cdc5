"""``corral serve``: the microsandbox-compatible control plane (see docs/server.md).

Modules: ``app`` (ASGI routing, auth, errors), ``http`` (ASGI helpers), ``models`` (the
cloud wire types), ``spec`` (create body → corral create), ``store`` (sqlite: orgs, API
keys, sandbox records), ``service`` (the control plane: lifecycle, org scoping),
``logs`` (per-sandbox log rings, SSE), ``msb_agent`` (microsandbox agent protocol codec,
sans-I/O), ``msb_session`` (one agent WebSocket onto a corral sandbox), ``host`` (the
adapter to corral's supervisor), ``run`` (hypercorn on trio), ``cli`` (``corral serve``).
"""
