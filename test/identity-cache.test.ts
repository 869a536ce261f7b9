// The identity caches over real TLS connections (docs/semantics.md#identity-cache): what a leaf
// already verified saves (no parsing, no chain walk, also on resumed sessions), and what it must
// never let through: a client of a removed root (also resuming a session), an expired leaf, or
// one client's identity on another's connection.
import t from 'tap'
import { randomBytes, X509Certificate } from 'node:crypto'
import tls from 'node:tls'
import type { TLSSocket } from 'node:tls'
import { DevCertificateAuthority } from '../lib/dev-agent/ca'
import { IdentityResolver, leafOfSession, peerCertificateOfSession } from '../lib/identity'
import type { PeerIdentity } from '../lib/identity'
import { dynamicTlsOf, httpsOptions } from '../lib/tls'
import type { DynamicTls, TlsMaterial } from '../lib/tls'

interface Creds { key: string, cert: string }
interface Outcome { peer: PeerIdentity, reused: boolean, sessionDer: Buffer | undefined }
interface Teardown { teardown (fn: () => unknown): void }

/**
 * What the resolver did, seen from outside: `parsed` counts the connections whose certificate it
 * asked Node for (done only for a leaf it does not know, or a handshake OpenSSL refused),
 * `verified` the signature checks of its chain walks.
 */
const work = { parsed: 0, verified: 0 }
const verify = X509Certificate.prototype.verify
X509Certificate.prototype.verify = function (this: X509Certificate, key) {
  work.verified++
  return verify.call(this, key)
}
t.teardown(() => { X509Certificate.prototype.verify = verify })
t.beforeEach(() => {
  work.parsed = 0
  work.verified = 0
})

/** Counts the resolver's getPeerX509Certificate() calls on `socket`. */
function watched (socket: TLSSocket): TLSSocket {
  const read = socket.getPeerX509Certificate.bind(socket)
  socket.getPeerX509Certificate = () => {
    work.parsed++
    return read()
  }
  return socket
}

/** A TLS server whose connections are resolved by `resolve` the moment they are secure. */
async function serve (t: Teardown, options: tls.TlsOptions, resolve: (socket: TLSSocket) => PeerIdentity, setup?: (server: tls.Server) => void): Promise<{ server: tls.Server, port: number, outcomes: Outcome[] }> {
  const outcomes: Outcome[] = []
  const server = tls.createServer(options, (socket) => {
    const session = socket.getSession()
    const at = session === undefined ? undefined : peerCertificateOfSession(session)
    const sessionDer = at === undefined || session === undefined ? undefined : Buffer.from(session.subarray(at.start, at.end))
    const peer = resolve(watched(socket))
    outcomes.push({ peer, reused: socket.isSessionReused(), sessionDer })
    socket.end(peer.identity?.service ?? `none: ${peer.reason}`)
  })
  setup?.(server)
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())))
  return { server, port: (server.address() as { port: number }).port, outcomes }
}

/** One connection: sends nothing, reads the server's answer; returns it with the session to resume. */
function connect (port: number, ca: string[], creds: Partial<Creds>, opts: { session?: Buffer | undefined, maxVersion?: tls.SecureVersion } = {}): Promise<{ answer: string, session: Buffer | undefined, reused: boolean }> {
  return new Promise((resolve, reject) => {
    let session: Buffer | undefined
    const socket = tls.connect({ host: '127.0.0.1', port, ca, ...creds, session: opts.session, maxVersion: opts.maxVersion ?? 'TLSv1.3', checkServerIdentity: () => undefined })
    let answer = ''
    let reused = false
    socket.on('secureConnect', () => { reused = socket.isSessionReused() })
    socket.on('session', (s: Buffer) => { session = s })
    socket.on('data', (chunk: Buffer) => { answer += chunk.toString() })
    socket.on('error', reject)
    socket.on('close', () => resolve({ answer, session, reused }))
  })
}

async function setup (): Promise<{ ca: DevCertificateAuthority, rootPem: string, server: { key: string, cert: string }, web: Creds, billing: Creds }> {
  const ca = await DevCertificateAuthority.create()
  const api = await ca.signLeaf('api')
  const web = await ca.signLeaf('web')
  const billing = await ca.signLeaf('billing')
  return {
    ca,
    rootPem: ca.roots()[0]?.RootCert as string,
    server: { key: api.privateKeyPem, cert: api.certPem },
    web: { key: web.privateKeyPem, cert: web.certPem },
    billing: { key: billing.privateKeyPem, cert: billing.certPem }
  }
}

t.test('the certificate read from the TLS session is the peer certificate, full and resumed, TLS 1.2 and 1.3', async (t) => {
  const f = await setup()
  const resolver = new IdentityResolver()
  resolver.setTrust({ trustDomain: f.ca.trustDomain, roots: [new X509Certificate(f.rootPem)] })
  const { port, outcomes } = await serve(t, { ...f.server, ca: [f.rootPem], requestCert: true, rejectUnauthorized: false }, (socket) => {
    const peer = resolver.peer({ socket }, Date.now())
    return peer
  })
  for (const maxVersion of ['TLSv1.2', 'TLSv1.3'] as const) {
    const first = await connect(port, [f.rootPem], f.web, { maxVersion })
    const second = await connect(port, [f.rootPem], f.web, { maxVersion, session: first.session })
    t.equal(second.reused, true, `${maxVersion}: the second connection resumed`)
    t.same([first.answer, second.answer], ['web', 'web'], maxVersion)
  }
  const webDer = new X509Certificate(f.web.cert).raw
  t.equal(outcomes.length, 4)
  for (const outcome of outcomes) t.ok(outcome.sessionDer?.equals(webDer), 'the session\'s [3] element is the client leaf')

  // Without a client certificate, the session holds none.
  const anonymous = await connect(port, [f.rootPem], {})
  t.match(anonymous.answer, /none: no client certificate/, 'said as such, not as a chain problem')
  t.equal(outcomes.at(-1)?.sessionDer, undefined)
})

t.test('a leaf seen under the current roots is neither parsed nor verified again, on new or resumed connections', async (t) => {
  const f = await setup()
  const resolver = new IdentityResolver()
  resolver.setTrust({ trustDomain: f.ca.trustDomain, roots: [new X509Certificate(f.rootPem)] })
  const { port } = await serve(t, { ...f.server, ca: [f.rootPem], requestCert: true, rejectUnauthorized: false },
    (socket) => resolver.peer({ socket }, Date.now()),
    (server) => server.on('connection', (raw: object) => resolver.noteConnection(raw)))

  const first = await connect(port, [f.rootPem], f.web)
  t.equal(first.answer, 'web')
  t.same(work, { parsed: 1, verified: 0 }, 'a handshake under the current roots: OpenSSL verified the chain, no walk')
  t.equal((await connect(port, [f.rootPem], f.web)).answer, 'web')
  const resumed = await connect(port, [f.rootPem], f.web, { session: first.session })
  t.equal(resumed.reused, true)
  t.equal(resumed.answer, 'web')
  t.same(work, { parsed: 1, verified: 0 }, 'a new and a resumed connection of the same leaf: nothing parsed or verified')
})

t.test('two clients never share an identity, whatever order their full and resumed connections come in', async (t) => {
  const f = await setup()
  const resolver = new IdentityResolver()
  resolver.setTrust({ trustDomain: f.ca.trustDomain, roots: [new X509Certificate(f.rootPem)] })
  const { port } = await serve(t, { ...f.server, ca: [f.rootPem], requestCert: true, rejectUnauthorized: false },
    (socket) => resolver.peer({ socket }, Date.now()),
    (server) => server.on('connection', (raw: object) => resolver.noteConnection(raw)))
  const sessions: Record<string, Buffer | undefined> = {}
  const answers: string[] = []
  for (const [name, creds, resume] of [['web', f.web, false], ['billing', f.billing, false], ['web', f.web, true], ['billing', f.billing, true],
    ['billing', f.billing, false], ['web', f.web, true]] as const) {
    const result = await connect(port, [f.rootPem], creds, { session: resume ? sessions[name] : undefined })
    t.equal(result.reused, resume, `${name} ${resume ? 'resumed' : 'full handshake'}`)
    sessions[name] = result.session ?? sessions[name]
    answers.push(result.answer)
  }
  t.same(answers, ['web', 'billing', 'web', 'billing', 'billing', 'web'])
  t.same(work, { parsed: 2, verified: 0 }, 'one entry per leaf')
})

t.test('an expired leaf is refused even when its identity is cached', async (t) => {
  const f = await setup()
  const resolver = new IdentityResolver()
  resolver.setTrust({ trustDomain: f.ca.trustDomain, roots: [new X509Certificate(f.rootPem)] })
  const notAfter = Date.parse(new X509Certificate(f.web.cert).validTo)
  let clock = Date.now()
  const { port } = await serve(t, { ...f.server, ca: [f.rootPem], requestCert: true, rejectUnauthorized: false },
    (socket) => resolver.peer({ socket }, clock),
    (server) => server.on('connection', (raw: object) => resolver.noteConnection(raw)))
  const first = await connect(port, [f.rootPem], f.web)
  t.equal(first.answer, 'web', 'cached while valid')
  clock = notAfter
  t.match((await connect(port, [f.rootPem], f.web)).answer, /none: certificate expired/, 'a new connection of the cached leaf')
  const resumed = await connect(port, [f.rootPem], f.web, { session: first.session })
  t.equal(resumed.reused, true)
  t.match(resumed.answer, /none: certificate expired/, 'a resumed session of the cached leaf')
  t.same(work, { parsed: 1, verified: 0 }, 'refused from the cache, by date')
})

t.test('after a roots change, a client of a removed root is refused, even resuming a session', async (t) => {
  const f = await setup()
  // The same ticket keys in every context, as a user may configure: sessions survive a context change.
  const options = httpsOptions({ ticketKeys: randomBytes(48) })
  const server = tls.createServer(options, (socket) => {
    const peer = state.identities.peer({ socket: watched(socket) }, Date.now())
    socket.end(peer.identity?.service ?? `none: ${peer.reason}`)
  })
  const state = dynamicTlsOf(server) as DynamicTls
  const material: TlsMaterial = { certPem: f.server.cert, keyPem: f.server.key, rootPems: [f.rootPem], trustDomain: f.ca.trustDomain }
  state.update(material)
  state.attach(server)
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())))
  const port = (server.address() as { port: number }).port

  const first = await connect(port, [f.rootPem], f.web)
  t.equal(first.answer, 'web')
  // A new server leaf under the same roots: the session is still trusted, without a chain walk.
  const api2 = await f.ca.signLeaf('api')
  state.update({ ...material, certPem: api2.certPem, keyPem: api2.privateKeyPem })
  const sameRoots = await connect(port, [f.rootPem], f.web, { session: first.session })
  t.equal(sameRoots.reused, true)
  t.equal(sameRoots.answer, 'web')
  t.same(work, { parsed: 1, verified: 0 })

  // Another CA replaces the roots (same trust domain): web's root is gone.
  const other = await DevCertificateAuthority.create({ clusterId: f.ca.clusterId })
  const otherRoot = other.roots()[0]?.RootCert as string
  const otherApi = await other.signLeaf('api')
  state.update({ certPem: otherApi.certPem, keyPem: otherApi.privateKeyPem, rootPems: [otherRoot], trustDomain: f.ca.trustDomain })
  const resumed = await connect(port, [f.rootPem, otherRoot], f.web, { session: sameRoots.session ?? first.session })
  t.equal(resumed.reused, true, 'the session resumed across the context change')
  t.match(resumed.answer, /none: client certificate does not chain to the current CA roots/, 'and its identity is refused')
  t.equal(work.parsed, 2, 'the resumed session was re-checked')
  const fresh = await connect(port, [f.rootPem, otherRoot], f.web)
  t.match(fresh.answer, /none: client certificate not verified/, 'a new handshake is refused by OpenSSL')

  // The old root back: the resumed session is trusted again after one more check.
  state.update({ ...material, rootPems: [f.rootPem, otherRoot] })
  const back = await connect(port, [f.rootPem, otherRoot], f.web, { session: resumed.session ?? first.session })
  t.equal(back.reused, true)
  t.equal(back.answer, 'web')
  // Three parses for identities, and one by the refused handshake (read to tell why it has none).
  t.equal(work.parsed, 4, 'a refused leaf got no entry: checked again after the roots change')
  t.ok(work.verified > 0, 'by a chain walk that verified its signature')
})

t.test('a session whose certificate is not the peer\'s is never read again', async (t) => {
  const f = await setup()
  const resolver = new IdentityResolver()
  resolver.setTrust({ trustDomain: f.ca.trustDomain, roots: [new X509Certificate(f.rootPem)] })
  const web = new X509Certificate(f.web.cert)
  const billing = new X509Certificate(f.billing.cert)
  let sessionReads = 0
  // Stand-ins for TLSSocket whose session holds `inSession` while the peer certificate is `peer`.
  const socket = (inSession: X509Certificate, peer: X509Certificate): TLSSocket => ({
    authorized: true,
    isSessionReused: () => false,
    getPeerCertificate: () => ({ raw: peer.raw }),
    getPeerX509Certificate: () => peer,
    getSession: () => {
      sessionReads++
      return der(0x30, Buffer.concat([der(0x02, Buffer.from([1])), der(0xa3, inSession.raw)]))
    }
  }) as unknown as TLSSocket
  t.equal(resolver.peer({ socket: socket(web, web) }, Date.now()).identity?.service, 'web')
  t.equal(sessionReads, 1)
  t.equal(resolver.peer({ socket: socket(billing, web) }, Date.now()).identity?.service, 'web', 'an unknown session leaf: the peer certificate decides')
  t.equal(sessionReads, 2)
  t.equal(resolver.peer({ socket: socket(web, billing) }, Date.now()).identity?.service, 'billing', 'after a mismatch, only the peer certificate counts')
  t.equal(sessionReads, 2, 'and sessions are not read any more')
})

function der (tag: number, content: Uint8Array): Buffer {
  const n = content.length
  const length = n < 0x80 ? [n] : n < 0x100 ? [0x81, n] : n < 0x10000 ? [0x82, n >> 8, n & 0xff] : [0x83, n >> 16, (n >> 8) & 0xff, n & 0xff]
  return Buffer.concat([Buffer.from([tag, ...length]), content])
}

t.test('peerCertificateOfSession reads only a well-formed [3] certificate', async (t) => {
  const cert = der(0x30, Buffer.alloc(300, 1))
  const session = (...fields: Buffer[]): Buffer => der(0x30, Buffer.concat(fields))
  const version = der(0x02, Buffer.from([1]))
  const ok = session(version, der(0xa1, der(0x02, Buffer.from([5]))), der(0xa3, cert))
  const at = peerCertificateOfSession(ok)
  t.ok(at !== undefined && ok.subarray(at.start, at.end).equals(cert))
  const big = der(0x30, Buffer.alloc(70_000, 2))
  const atBig = peerCertificateOfSession(session(version, der(0xa3, big)))
  t.equal(atBig === undefined ? 0 : atBig.end - atBig.start, big.length, 'three length bytes')

  t.equal(peerCertificateOfSession(session(version)), undefined, 'no [3] element')
  t.equal(peerCertificateOfSession(der(0x31, Buffer.concat([version, der(0xa3, cert)]))), undefined, 'not a SEQUENCE')
  t.equal(peerCertificateOfSession(Buffer.concat([ok, Buffer.from([0])])), undefined, 'trailing bytes')
  t.equal(peerCertificateOfSession(ok.subarray(0, ok.length - 1)), undefined, 'truncated')
  t.equal(peerCertificateOfSession(Buffer.from([0x30])), undefined, 'no length')
  t.equal(peerCertificateOfSession(session(version, der(0xa3, der(0x04, Buffer.alloc(3))))), undefined, '[3] holding no certificate')
  t.equal(peerCertificateOfSession(session(version, der(0xa3, Buffer.concat([cert, Buffer.from([0])])))), undefined, '[3] with trailing bytes')
  t.equal(peerCertificateOfSession(Buffer.from([0x30, 0x80, 0x02, 0x01, 0x01, 0x00, 0x00])), undefined, 'indefinite length')
  t.equal(peerCertificateOfSession(Buffer.from([0x30, 0x84, 0, 0, 0, 3, 0x02, 0x01, 0x01])), undefined, 'four length bytes')
  t.equal(peerCertificateOfSession(Buffer.from([0x30, 0x82, 0x01])), undefined, 'length bytes cut short')
  t.equal(peerCertificateOfSession(Buffer.from([0x30, 0x03, 0x02, 0x05, 0x01])), undefined, 'a field running past the session')
  t.equal(leafOfSession({ getSession: () => undefined } as unknown as TLSSocket), undefined, 'no session')
  t.equal(leafOfSession({} as unknown as TLSSocket), undefined, 'no getSession')
})
