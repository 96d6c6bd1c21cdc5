"""The actor layer (private modules; the public names are re-exported by ``corral``).

- ``mailbox``: the Actor base (bounded mailbox, ask/tell, a priority mailbox for control).
- ``state``: SandboxStatus and Watch (a value tasks wait on, no polling).
- ``channel``: AgentChannel, conversations multiplexed over one agent stream.
- ``execs`` / ``fsops``: exec (collected or streamed, credit flow control) and fs requests.
- ``sandbox``: SandboxActor (one sandbox: lifecycle, the stop ladder, concurrent requests).
- ``supervisor``: Supervisor and open_supervisor.
"""
