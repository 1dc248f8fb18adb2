"""Ferry on Kubernetes: pods on this node and the policy kinds, from the API server.

- `pods` (pure): pods and namespaces as plain data, the enrollment rules from labels, the plan
  that turns what the watches and the namespace finder know into enroll / unenroll / relabel
  actions, and the `ferry.dev/redirection` annotations;
- `cgroups` (pure): a pod's UID from a process's `/proc/<pid>/cgroup`;
- `watch` (pure): reflector bookkeeping (resourceVersion, 410 Gone, backoff, error counts);
- `client`: the API client (lightkube; why in its docstring), list-then-watch loops and PATCH;
- `scan`: the network namespaces of pods that existed before the agent, from /proc (psutil);
- `controller`: the agent's Kubernetes part, wiring the above to the enrollment path;
- `policy_source`: the policy kinds from the watches as a `PolicySource`.
"""
