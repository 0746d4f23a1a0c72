"""Pod discovery: which pods on this node infertap inspects, and their cgroup v2 paths."""
