"""The engine: sequences, the paged block manager, the scheduler and its step plan, the runner."""
