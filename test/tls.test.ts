// DynamicTls, httpsOptions() and dynamicTlsOf() without a network: servers are created but never
// listen, and connections are stand-in objects with the parts of a TLSSocket the resolver reads.
import t from 'tap'
import { constants } from 'node:crypto'
import { X509Certificate } from 'node:crypto'
import http from 'node:http'
import https from 'node:https'
import net from 'node:net'
import tls from 'node:tls'
import type { SecureContext, SecureContextOptions } from 'node:tls'
import { DevCertificateAuthority } from '../lib/dev-agent/ca'
import type { TlsRequest } from '../lib/identity'
import { DynamicTls, dynamicTlsOf, httpsOptions } from '../lib/tls'
import type { TlsMaterial } from '../lib/tls'

interface Fixtures {
  ca: DevCertificateAuthority
  /** Same trust domain, another key: its root does not verify `ca`'s leaves. */
  sibling: DevCertificateAuthority
  material: TlsMaterial
  /** Another server leaf of `ca`, same roots. */
  material2: TlsMaterial
  rootPem: string
  siblingRootPem: string
}

let fixturesOnce: Promise<Fixtures> | undefined
function fixtures (): Promise<Fixtures> {
  fixturesOnce ??= (async () => {
    const ca = await DevCertificateAuthority.create()
    const sibling = await DevCertificateAuthority.create({ clusterId: ca.clusterId })
    const rootPem = ca.roots()[0]?.RootCert as string
    const leaf = await ca.signLeaf('api')
    const leaf2 = await ca.signLeaf('api')
    return {
      ca,
      sibling,
      rootPem,
      siblingRootPem: sibling.roots()[0]?.RootCert as string,
      material: { certPem: leaf.certPem, keyPem: leaf.privateKeyPem, rootPems: [rootPem], trustDomain: ca.trustDomain },
      material2: { certPem: leaf2.certPem, keyPem: leaf2.privateKeyPem, rootPems: [rootPem], trustDomain: ca.trustDomain }
    }
  })()
  return fixturesOnce
}

function sni (state: DynamicTls): { err: Error | null, ctx: SecureContext | undefined } {
  let result: { err: Error | null, ctx: SecureContext | undefined } | undefined
  state.SNICallback('api.example', (err, ctx) => { result = { err, ctx } })
  if (result === undefined) throw new Error('SNICallback did not call back synchronously')
  return result
}

/** Records the options of every setSecureContext() call on `server`, still applying them. */
function recordContexts (server: tls.Server): SecureContextOptions[] {
  const seen: SecureContextOptions[] = []
  const original = server.setSecureContext.bind(server)
  server.setSecureContext = (options: SecureContextOptions) => {
    seen.push(options)
    original(options)
  }
  return seen
}

/** A verified client connection presenting `certPem` (leaf only), as the resolver sees it. */
function clientConnection (certPem: string): TlsRequest {
  const cert = new X509Certificate(certPem)
  const socket = {
    authorized: true,
    getPeerX509Certificate: () => cert,
    isSessionReused: () => false,
    getPeerCertificate: () => ({ raw: cert.raw, issuerCertificate: undefined })
  }
  return { socket: socket as never }
}

t.test('SNICallback gives no context before the first update, then the current one', async (t) => {
  const f = await fixtures()
  const state = new DynamicTls()
  t.same(sni(state), { err: null, ctx: undefined }, 'undefined keeps the server\'s default context')

  state.update(f.material)
  const first = sni(state)
  t.equal(first.err, null)
  t.ok(first.ctx !== undefined && 'context' in first.ctx, 'a SecureContext')
  t.equal(sni(state).ctx, first.ctx, 'the same context until the next update')

  state.update(f.material2)
  const second = sni(state).ctx
  t.ok(second !== undefined && 'context' in second)
  t.not(second, first.ctx, 'a new context per update')
})

t.test('update() with a key that does not match its certificate throws and keeps the previous material', async (t) => {
  const f = await fixtures()
  const state = new DynamicTls()
  state.update(f.material)
  const ctx = sni(state).ctx
  t.throws(() => state.update({ ...f.material2, keyPem: f.material.keyPem }))
  t.equal(state.material, f.material)
  t.equal(sni(state).ctx, ctx)
})

t.test('attach() takes charge of TLS servers only, each once', async (t) => {
  const f = await fixtures()
  const state = new DynamicTls()

  state.attach(http.createServer())
  state.attach(net.createServer())
  state.attach({})

  const server = tls.createServer()
  const contexts = recordContexts(server)
  const listeners = server.listenerCount('connection')
  state.attach(server)
  t.equal(server.listenerCount('connection'), listeners + 1, 'one connection listener')
  state.attach(server)
  t.equal(server.listenerCount('connection'), listeners + 1, 'attaching again adds none')
  t.same(contexts, [], 'no material yet: the server keeps its own context')

  // An attached HTTP or plain TCP server has no setSecureContext(): updating would throw.
  t.doesNotThrow(() => state.update(f.material), 'non-TLS servers were ignored')
  t.match(contexts, [{ key: f.material.keyPem, cert: f.material.certPem, ca: f.material.rootPems, sessionIdContext: state.id, secureOptions: constants.SSL_OP_NO_RENEGOTIATION }],
    'an update reaches the attached server, with the settings every context carries')

  const late = https.createServer()
  const lateContexts = recordContexts(late)
  state.attach(late)
  t.match(lateContexts, [{ key: f.material.keyPem, cert: f.material.certPem, ca: f.material.rootPems }],
    'a server attached after the first update gets the current material at once')
})

t.test('a connection seen by an attached server is trusted under the roots of its handshake', async (t) => {
  const f = await fixtures()
  const state = new DynamicTls()
  state.update(f.material)
  const server = tls.createServer()
  state.attach(server)
  const onConnection = server.listeners('connection').at(-1) as (socket: object) => void

  // A leaf of the sibling CA does not chain to the current root: only a connection noted at
  // connect time (whose handshake the server verified) keeps its identity without the chain walk.
  const siblingLeaf = (await f.sibling.signLeaf('web')).certPem
  const unseen = clientConnection(siblingLeaf)
  t.match(state.identities.peer(unseen, Date.now()).reason, /does not chain to the current CA roots/)

  const seen = clientConnection(siblingLeaf)
  onConnection(seen.socket)
  t.equal(state.identities.peer(seen, Date.now()).identity?.service, 'web')
})

t.test('a change of roots re-validates cached identities; the same roots do not', async (t) => {
  const f = await fixtures()
  const state = new DynamicTls()
  const conn = clientConnection((await f.ca.signLeaf('web')).certPem)
  const now = Date.now()

  state.update(f.material)
  const first = state.identities.peer(conn, now)
  t.equal(first.identity?.service, 'web')

  state.update({ ...f.material2, rootPems: [...f.material.rootPems] })
  t.equal(state.identities.peer(conn, now), first, 'a new leaf with an identical root list keeps the cached identity')

  state.update({ ...f.material2, rootPems: [f.siblingRootPem] })
  const replaced = state.identities.peer(conn, now)
  t.not(replaced, first, 'same number of roots, another root: recomputed')
  t.equal(replaced.identity, null)
  t.match(replaced.reason, /does not chain to the current CA roots/)

  state.update({ ...f.material2, rootPems: [f.siblingRootPem, f.rootPem] })
  const added = state.identities.peer(conn, now)
  t.not(added, replaced, 'another number of roots: recomputed')
  t.equal(added.identity?.service, 'web', 'the signing root is trusted again')

  state.update({ ...f.material2, rootPems: [f.siblingRootPem, f.rootPem], trustDomain: 'other.consul' })
  const moved = state.identities.peer(conn, now)
  t.not(moved, added, 'same roots under another trust domain: recomputed')
  t.match(moved.reason, /trust domain .* is not other\.consul/)
})

t.test('dynamicTlsOf() finds the state of servers made from httpsOptions() only', async (t) => {
  t.equal(dynamicTlsOf(http.createServer()), null, 'not a TLS server')
  t.equal(dynamicTlsOf(null), null)
  t.equal(dynamicTlsOf(tls.createServer()), null, 'a TLS server with its own session id context')
  t.equal(dynamicTlsOf(https.createServer({ sessionIdContext: 'not-registered' })), null, 'a session id context httpsOptions() did not make')
  t.equal(dynamicTlsOf(Object.create(tls.Server.prototype)), null, 'a TLS server without a session id context')

  const options = httpsOptions()
  const state = dynamicTlsOf(https.createServer(options))
  t.type(state, DynamicTls)
  t.equal(options.sessionIdContext, state?.id)
  t.equal(options.SNICallback, state?.SNICallback)
  t.equal(dynamicTlsOf(tls.createServer(options)), state, 'every server built from the same options shares it')
  t.not(dynamicTlsOf(https.createServer(httpsOptions())), state, 'each httpsOptions() call has its own state')
})

t.test('detachAll() forgets every server and unregisters the state', async (t) => {
  const f = await fixtures()
  const options = httpsOptions()
  const server = https.createServer(options)
  const state = dynamicTlsOf(server) as DynamicTls
  state.attach(server)
  const contexts = recordContexts(server)

  state.detachAll()
  t.equal(dynamicTlsOf(server), null, 'the server no longer maps to the state')
  state.update(f.material)
  t.same(contexts, [], 'a detached server is not updated')
})

t.test('httpsOptions() reads the current material through key, cert and ca', async (t) => {
  const f = await fixtures()
  const options = httpsOptions({ maxVersion: 'TLSv1.3', allowHTTP1: true })
  t.match(options, { minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3', allowHTTP1: true, requestCert: true, rejectUnauthorized: false })
  t.equal(options.key, undefined)
  t.equal(options.cert, undefined)
  t.equal(options.ca, undefined)
  t.ok(Object.keys(options).includes('key'), 'key, cert and ca are enumerable (Node copies options)')

  const state = dynamicTlsOf(https.createServer(options)) as DynamicTls
  state.update(f.material)
  t.equal(options.key, f.material.keyPem)
  t.equal(options.cert, f.material.certPem)
  t.same(options.ca, f.material.rootPems)
  t.not(options.ca, f.material.rootPems, 'a copy of the roots')
  t.doesNotThrow(() => https.createServer(options), 'a server built now starts with the current key and certificate')

  t.throws(() => httpsOptions('TLSv1.3' as never), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: /expects an object/ })
  for (const owned of ['key', 'cert', 'ca', 'pfx', 'requestCert', 'rejectUnauthorized', 'SNICallback', 'sessionIdContext']) {
    t.throws(() => httpsOptions({ [owned]: undefined } as never), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: new RegExp(`httpsOptions\\(\\{ ${owned} \\}\\)`) }, owned)
  }
  t.throws(() => httpsOptions({ minVersion: 'TLSv1.1' }), { message: /minVersion .*must be 'TLSv1\.2' or 'TLSv1\.3', got "TLSv1\.1"/ })
  t.throws(() => httpsOptions({ maxVersion: 'TLSv1' }), { message: /maxVersion .*got "TLSv1"/ })
})
