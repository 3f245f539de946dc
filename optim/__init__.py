"""Adam-mini (one second moment per head/neuron/token block), exact under FSDP sharding."""
