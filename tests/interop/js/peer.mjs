// A long-lived js-libp2p + Helia peer driven by latticaray's interop tests.
//
// It listens on 127.0.0.1 (TCP with Noise and yamux, QUIC-v1; INTEROP_LISTEN, comma-separated
// multiaddrs, overrides that, e.g. inside a netlab namespace), prints one JSON line
// {"ready": {...}} and then answers JSON-line commands on stdin, one reply line per command:
//   {"id": 1, "cmd": "dial", "addr": "/ip4/127.0.0.1/tcp/4001/p2p/12D3..."}
//   -> {"id": 1, "ok": true, "result": ...} or {"id": 1, "ok": false, "error": "..."}
// It exits when stdin closes or on {"cmd": "quit"}.
//
// INTEROP_DCUTR=1 adds the DCUtR service. js-libp2p's DCUtR sends and dials only public
// addresses (@libp2p/utils/private-ip counts netlab's 198.18.0.0/15 as private), but takes a
// /dns4/ address as public: INTEROP_HOSTS='{"name": "198.18.0.102"}' resolves such names
// (a static resolver given to the connection manager; no DNS server is asked).

// node 20 lacks Promise.withResolvers, which recent libp2p modules use
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

import { createHash } from 'node:crypto'
import { createInterface } from 'node:readline'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { quic } from '@chainsafe/libp2p-quic'
import { identify, identifyPush } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { dcutr } from '@libp2p/dcutr'
import { circuitRelayServer, circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { kadDHT, passthroughMapper } from '@libp2p/kad-dht'
import { multiaddr } from '@multiformats/multiaddr'
import { peerIdFromString } from '@libp2p/peer-id'
import { Helia } from '@helia/utils'
import { bitswap } from '@helia/block-brokers'
import { MemoryBlockstore } from 'blockstore-core'
import { MemoryDatastore } from 'datastore-core'
import { CID } from 'multiformats/cid'
import * as raw from 'multiformats/codecs/raw'
import { sha256 } from 'multiformats/hashes/sha2'

const kadProtocol = process.env.INTEROP_KAD_PROTOCOL || '/ipfs/kad/1.0.0'
const kadClientMode = process.env.INTEROP_KAD_CLIENT === '1'
const timeoutMs = Number(process.env.INTEROP_TIMEOUT_MS || 15000)
const listen = process.env.INTEROP_LISTEN
  ? process.env.INTEROP_LISTEN.split(',')
  : ['/ip4/127.0.0.1/tcp/0', '/ip4/127.0.0.1/udp/0/quic-v1']
const hosts = JSON.parse(process.env.INTEROP_HOSTS || '{}')

// /dns4/NAME/... -> /ip4/IP/... for the names in INTEROP_HOSTS only
const staticHosts = {
  canResolve: (ma) => ma.getComponents().some(c => c.name === 'dns4' && hosts[c.value] != null),
  async resolve (ma) {
    return [multiaddr(ma.getComponents().map(c => {
      if (c.name === 'dns4' && hosts[c.value] != null) return `/ip4/${hosts[c.value]}`
      return c.value == null ? `/${c.name}` : `/${c.name}/${c.value}`
    }).join(''))]
  }
}
const extraServices = process.env.INTEROP_DCUTR === '1' ? { dcutr: dcutr() } : {}

const libp2p = await createLibp2p({
  addresses: { listen },
  transports: [tcp(), quic(), circuitRelayTransport()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  connectionGater: { denyDialMultiaddr: () => false },
  // every test dials from 127.0.0.1, many times a second: lift the per-host inbound rate limit
  connectionManager: {
    allow: ['/ip4/127.0.0.1'],
    inboundConnectionThreshold: 1000,
    maxIncomingPendingConnections: 100,
    ...(Object.keys(hosts).length > 0 ? { resolvers: { dns4: staticHosts } } : {})
  },
  services: {
    identify: identify(),
    identifyPush: identifyPush(),
    // libp2p's connection monitor pings every connection every 10 s on the same protocol: with
    // the default limit of one outbound ping stream per connection, a test's ping that meets a
    // heartbeat fails with TooManyOutboundProtocolStreamsError (seen on netlab's lossy WAN)
    ping: ping({ maxOutboundStreams: 4 }),
    relay: circuitRelayServer({ reservations: { maxReservations: 64 } }),
    dht: kadDHT({
      protocol: kadProtocol,
      clientMode: kadClientMode,
      peerInfoMapper: passthroughMapper,
      allowQueryWithZeroPeers: true,
      validators: { latticaray: async () => {} },
      selectors: { latticaray: () => 0 }
    }),
    ...extraServices
  }
})

const helia = new Helia({
  libp2p,
  blockstore: new MemoryBlockstore(),
  datastore: new MemoryDatastore(),
  blockBrokers: [bitswap()]
})
await helia.start()

const b64 = (u8) => Buffer.from(u8).toString('base64')
const fromB64 = (s) => new Uint8Array(Buffer.from(s, 'base64'))
const signal = () => AbortSignal.timeout(timeoutMs)

const commands = {
  async info () {
    return { peerId: libp2p.peerId.toString(), addrs: libp2p.getMultiaddrs().map(String) }
  },
  async dial ({ addr }) {
    const conn = await libp2p.dial(multiaddr(addr), { signal: signal() })
    return { remotePeer: conn.remotePeer.toString(), remoteAddr: conn.remoteAddr.toString() }
  },
  // a test's peer is gone for good when it hangs up: drop it from the DHT routing table and
  // the peer store too, so later tests' lookups do not wait on it
  async hangup ({ peer }) {
    const id = peerIdFromString(peer)
    await libp2p.hangUp(id)
    await libp2p.services.dht.routingTable.remove(id)
    try { await libp2p.peerStore.delete(id) } catch {}
    return true
  },
  async connections () {
    return libp2p.getConnections().map(c => ({
      remotePeer: c.remotePeer.toString(),
      remoteAddr: c.remoteAddr.toString(),
      encryption: c.encryption,
      multiplexer: c.multiplexer,
      direction: c.direction,
      limited: c.limits != null,
      status: c.status
    }))
  },
  // dial addr, then ping its peer on one /ipfs/ping/1.0.0 stream of that connection (also
  // when it is a limited, relayed one) up to count times; stops at the first failure
  async pingMany ({ addr, count }) {
    let done = 0
    try {
      const conn = await libp2p.dial(multiaddr(addr), { signal: signal() })
      const stream = await conn.newStream('/ipfs/ping/1.0.0', { runOnLimitedConnection: true, signal: signal() })
      const source = stream.source[Symbol.asyncIterator]()
      let buffered = new Uint8Array(0)
      const readN = async (n) => {
        while (buffered.length < n) {
          const { value, done: ended } = await source.next()
          if (ended) throw new Error('ping stream ended')
          buffered = Buffer.concat([buffered, value.subarray()])
        }
        const out = buffered.subarray(0, n)
        buffered = buffered.subarray(n)
        return out
      }
      await stream.sink((async function * () {
        for (; done < count; done++) {
          const data = crypto.getRandomValues(new Uint8Array(32))
          yield data
          const echo = await readN(32)
          if (Buffer.compare(Buffer.from(echo), Buffer.from(data)) !== 0) throw new Error('bad ping echo')
        }
      })())
      await stream.close()
    } catch (err) {
      return { done, error: `${err.name}: ${err.message}` }
    }
    return { done, error: null }
  },
  // ping a connected peer on the connection js picks for it (direct before limited)
  async pingPeer ({ peer }) {
    return await libp2p.services.ping.ping(peerIdFromString(peer), { signal: signal() })
  },
  // take addr as one of our confirmed public addresses (what AutoNAT would confirm; identify
  // drops observed addresses that js counts as private)
  async confirmAddr ({ addr }) {
    libp2p.components.addressManager.addObservedAddr(multiaddr(addr))
    libp2p.components.addressManager.confirmObservedAddr(multiaddr(addr), { type: 'observed' })
    return libp2p.getMultiaddrs().map(String)
  },
  // circuit relay v2 client: reserve a slot on the relay at addr (.../p2p/RELAY); returns this
  // peer's circuit addresses once the reservation is held
  async reserve ({ addr }) {
    await libp2p.components.transportManager.listen([multiaddr(addr + '/p2p-circuit')])
    return libp2p.getMultiaddrs().map(String).filter(a => a.includes('/p2p-circuit'))
  },
  // what the relay server carries now: reserved peers
  async relayReservations () {
    return [...libp2p.services.relay.reservations.keys()].map(String)
  },
  // force: a new connection to addr even if one to its peer exists (e.g. a relayed path
  // beside a direct one)
  async ping ({ addr, force }) {
    return await libp2p.services.ping.ping(multiaddr(addr), { signal: signal(), force: force === true })
  },
  async identify ({ peer }) {
    const conn = libp2p.getConnections(peerIdFromString(peer))[0]
    if (conn == null) throw new Error('not connected')
    const result = await libp2p.services.identify.identify(conn, { signal: signal() })
    return {
      peerId: result.peerId.toString(),
      protocols: result.protocols,
      listenAddrs: result.listenAddrs.map(String),
      agentVersion: result.agentVersion,
      protocolVersion: result.protocolVersion,
      observedAddr: result.observedAddr?.toString(),
      signedPeerRecord: result.signedPeerRecord != null
        ? { addresses: result.signedPeerRecord.addresses.map(String), seq: String(result.signedPeerRecord.seq) }
        : null
    }
  },
  async peerStore ({ peer }) {
    const p = await libp2p.peerStore.get(peerIdFromString(peer))
    return {
      protocols: p.protocols,
      addresses: p.addresses.map(a => ({ addr: a.multiaddr.toString(), certified: a.isCertified })),
      agentVersion: p.metadata.get('AgentVersion') ? new TextDecoder().decode(p.metadata.get('AgentVersion')) : null
    }
  },
  async kadFindPeer ({ peer }) {
    const info = await libp2p.peerRouting.findPeer(peerIdFromString(peer), { signal: signal() })
    return { id: info.id.toString(), addrs: info.multiaddrs.map(String) }
  },
  async kadPut ({ key, value }) {
    await libp2p.contentRouting.put(new TextEncoder().encode(key), fromB64(value), { signal: signal() })
    return true
  },
  async kadGet ({ key }) {
    return b64(await libp2p.contentRouting.get(new TextEncoder().encode(key), { signal: signal() }))
  },
  async kadProvide ({ cid }) {
    await libp2p.contentRouting.provide(CID.parse(cid), { signal: signal() })
    return true
  },
  async kadFindProviders ({ cid, limit }) {
    const out = []
    for await (const p of libp2p.contentRouting.findProviders(CID.parse(cid), { signal: signal() })) {
      out.push({ id: p.id.toString(), addrs: p.multiaddrs.map(String) })
      if (out.length >= (limit || 1)) break
    }
    return out
  },
  async routingTable () {
    return libp2p.services.dht.routingTable.size
  },
  async kadTableHas ({ peer }) {
    return (await libp2p.services.dht.routingTable.find(peerIdFromString(peer))) != null
  },
  async blockPut ({ data }) {
    const bytes = fromB64(data)
    const cid = CID.createV1(raw.code, await sha256.digest(bytes))
    await helia.blockstore.put(cid, bytes)
    return cid.toString()
  },
  // bytes under a CID the caller names (a DAG-CBOR node, or a wrong block for a test): the
  // memory blockstore stores what it is given
  async blockPutAs ({ cid, data }) {
    await helia.blockstore.put(CID.parse(cid), fromB64(data))
    return true
  },
  async blockHas ({ cid }) {
    return await helia.blockstore.has(CID.parse(cid))
  },
  async blockGet ({ cid, timeoutMs }) {
    const started = performance.now()
    const wait = timeoutMs ? AbortSignal.timeout(timeoutMs) : signal()
    const bytes = await helia.blockstore.get(CID.parse(cid), { signal: wait })
    return { data: b64(bytes), ms: performance.now() - started }
  },
  async blockGetSize ({ cid }) {
    const started = performance.now()
    const bytes = await helia.blockstore.get(CID.parse(cid), { signal: signal() })
    return { size: bytes.length, ms: performance.now() - started }
  },
  async blockMake ({ count, size }) {
    const cids = []
    for (let i = 0; i < count; i++) {
      const bytes = new Uint8Array(size)
      crypto.getRandomValues(bytes.subarray(0, Math.min(size, 65536)))
      new DataView(bytes.buffer).setUint32(size - 4, i)
      const cid = CID.createV1(raw.code, await sha256.digest(bytes))
      await helia.blockstore.put(cid, bytes)
      cids.push(cid.toString())
    }
    return cids
  },
  // every block (Helia verifies each against its CID); sha256: the hex SHA-256 of the blocks
  // concatenated in the order given (what a reader of the whole object would hold)
  async blockGetMany ({ cids }) {
    const started = performance.now()
    const blocks = await Promise.all(cids.map(async (c) => {
      return await helia.blockstore.get(CID.parse(c), { signal: AbortSignal.timeout(120000) })
    }))
    const hash = createHash('sha256')
    for (const b of blocks) hash.update(b)
    return {
      bytes: blocks.reduce((a, b) => a + b.length, 0),
      ms: performance.now() - started,
      sha256: hash.digest('hex')
    }
  },
  // forget blocks (the long-lived peer's memory blockstore would keep every 100 MB run)
  async blockDelete ({ cids }) {
    for (const c of cids) await helia.blockstore.delete(CID.parse(c))
    return cids.length
  },
  async quit () {
    setImmediate(shutdown)
    return true
  }
}

let stopping = false
async function shutdown () {
  if (stopping) return
  stopping = true
  try { await helia.stop() } catch {}
  process.exit(0)
}

function reply (obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

reply({ ready: await commands.info() })

const rl = createInterface({ input: process.stdin })
rl.on('line', async (line) => {
  let msg
  try {
    msg = JSON.parse(line)
  } catch (err) {
    reply({ id: null, ok: false, error: `bad JSON: ${err.message}` })
    return
  }
  const fn = commands[msg.cmd]
  if (fn == null) {
    reply({ id: msg.id, ok: false, error: `unknown command ${msg.cmd}` })
    return
  }
  try {
    reply({ id: msg.id, ok: true, result: await fn(msg) })
  } catch (err) {
    reply({ id: msg.id, ok: false, error: `${err.name}: ${err.message}` })
  }
})
rl.on('close', shutdown)
process.on('SIGTERM', shutdown)
