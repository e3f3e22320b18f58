"""Host-side services a workspace's guest reaches over the guest agent's channel: credential
brokers (one upstream each; the real key is added on the host and never enters the guest) and
the egress forward proxy of ``network.allow``. They run in one gateway process per running
workspace, owned by its supervisor, and write every request and decision to the audit log."""
