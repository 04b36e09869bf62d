"""The console programs (absl flags): thin wrappers around the library."""
