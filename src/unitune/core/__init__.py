"""Infrastructure every layer uses: atomic I/O, the allocator, secrets, resource usage, signals."""
