// CA rotation under load: new handshakes get the new chain as soon as the agent answers, open
// keep-alive connections keep working, and no request fails on the way.
import t from 'tap'
import { newCaKey } from './helpers/mesh'
import { EventEmitter } from 'node:events'
import tls from 'node:tls'
import { X509Certificate } from 'node:crypto'
import { Agent } from 'undici'
import { agentCall, get, leafFor, mtlsClient, startAgent, startService, waitForStatus } from './helpers/mesh'

function serverChain (port: number, ca: string[], creds: { key: string, cert: string }): Promise<X509Certificate[]> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, ca, ...creds, checkServerIdentity: () => undefined }, () => {
      const chain: X509Certificate[] = []
      let node: tls.DetailedPeerCertificate | undefined = socket.getPeerCertificate(true)
      const seen = new Set<string>()
      while (node?.raw !== undefined && !seen.has(node.fingerprint256)) {
        seen.add(node.fingerprint256)
        chain.push(new X509Certificate(node.raw))
        node = node.issuerCertificate
      }
      socket.end()
      resolve(chain)
    })
    socket.on('error', reject)
  })
}

t.test('a CA rotation under continuous load fails no request and serves the new chain', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const svc = await startService(t, agent)
  const oldCreds = await leafFor(agent, 'web')
  const oldRoot = oldCreds.ca[0] as string

  // A keep-alive client and a client that opens a new connection for every request.
  const keepAlive = mtlsClient(t, oldCreds)
  let failures = 0
  let requests = 0
  const state = { running: true }
  const progress = new EventEmitter()
  const loop = async (fresh: boolean): Promise<void> => {
    while (state.running) {
      const dispatcher = fresh ? new Agent({ connect: { ...oldCreds, checkServerIdentity: () => undefined }, pipelining: 0 }) : keepAlive
      try {
        const res = await get(dispatcher, `${svc.origin}/`)
        requests++
        progress.emit('request')
        if (res.status !== 200) failures++
      } catch {
        failures++
      } finally {
        if (fresh) await dispatcher.close()
      }
    }
  }
  const loops = [loop(false), loop(false), loop(true)]

  const oldSerial = svc.app.consulNative.status().leaf?.serial
  const res = await agentCall(agent, 'PUT', '/v1/connect/ca/configuration', { Provider: 'consul', Config: { LeafCertTTL: '72h', PrivateKey: newCaKey() } })
  t.equal(res.status, 200, 'rotation accepted')
  // Both the new roots and the new leaf (cross-signed chain) must be in place.
  await waitForStatus(svc.app, (status) => status.leaf?.serial !== oldSerial && status.roots?.ids.length === 2)
  // Keep the load on for 20 more requests after the new material is in place.
  const target = requests + 20
  await new Promise<void>((resolve) => {
    const onRequest = (): void => {
      if (requests < target) return
      progress.off('request', onRequest)
      resolve()
    }
    progress.on('request', onRequest)
  })
  state.running = false
  await Promise.all(loops)
  t.equal(failures, 0, `no failed request out of ${requests}`)

  const roots = (await agentCall(agent, 'GET', '/v1/agent/connect/ca/roots')).body
  t.equal(roots.Roots.length, 2, 'two roots after rotation')
  const newRoot = roots.Roots.find((root: { Active: boolean }) => root.Active).RootCert as string

  // A new connection now sees a leaf that chains to the new root and, cross-signed, to the old.
  const chain = await serverChain(svc.port, [newRoot], { key: oldCreds.key, cert: oldCreds.cert })
  t.ok(chain[0]?.verify(new X509Certificate(newRoot).publicKey), 'the served leaf is signed by the new root key')
  const crossSigned = await serverChain(svc.port, [oldRoot], { key: oldCreds.key, cert: oldCreds.cert })
  t.ok(crossSigned.length >= 2, 'the served chain carries the cross-signed intermediate')

  // New leaves work too.
  const fresh = mtlsClient(t, await leafFor(agent, 'web'))
  t.equal((await get(fresh, `${svc.origin}/`)).status, 200)
})
