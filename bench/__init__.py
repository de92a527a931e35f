"""Speed and memory benchmarks and CPU allocator tooling; not part of the installed package."""
