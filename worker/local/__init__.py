"""Local servers for the demo, tests and benchmarks: the Check365 simulator, a verifying receiver, a throwaway Redis."""
