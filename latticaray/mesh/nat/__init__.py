"""NAT traversal: AutoNAT reachability, NAT type detection, circuit relay, hole punching, rendezvous."""
