"""Kademlia DHT: sans-I/O routing/lookup/record core and its asyncio driver over mesh RPC."""
