"""Ferry's Kubernetes manifests; `generate` makes the CRDs from the policy schemas."""
