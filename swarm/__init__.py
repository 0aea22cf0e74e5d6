"""The model, the data, the in-process mesh and the network roles."""

import os

# Shared-memory tensors between our processes and hivemind's (its DHT process, its futures) use
# torch's "file_descriptor" strategy, torch's own default on Linux. hivemind switches torch to "file_system" when it is
# imported, unless this variable says otherwise; that strategy goes through a torch_shm_manager daemon over a socket,
# and a tensor freed after that socket broke aborts the whole process from C++ ("std::system_error: Broken pipe"),
# which is how one of our swarm tests died at teardown, now and then, in CI. Set the variable to keep hivemind's
# choice.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
