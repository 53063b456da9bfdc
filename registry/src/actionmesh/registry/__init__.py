"""The registry: providers register under renewable leases, are health-checked, and watched."""
