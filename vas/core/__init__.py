"""The parts of vas shared by the client, the CLI, the agent and the coordinator:
pure policy and checks, no I/O to other processes."""
