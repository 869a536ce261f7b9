// ConsulSync against an in-memory agent (test/helpers/stub-agent.ts) and real certificates from the
// dev CA: the start-up order, rejected updates, default-policy and protocol resolution, the
// not-ready report, expiry warnings and shutdown, each driven by answering polls, never by time.
import t from 'tap'
import type { Test } from 'tap'
import { once } from 'node:events'
import type { ServiceDefaultsView, ProxyDefaultsView, MeshView, AgentSelfView } from '../lib/agent/parse'
import type { IndexedCARoots, Intention, IssuedCert } from '../lib/agent/wire'
import { withAgentStatus } from '../lib/agent/client'
import { DevCertificateAuthority } from '../lib/dev-agent/ca'
import { decide } from '../lib/intentions/policy'
import type { CompiledPolicy } from '../lib/intentions/policy'
import { resolveOptions } from '../lib/options'
import type { ConsulNativeOptions } from '../lib/options'
import { ConsulSync, syncTimings } from '../lib/sync'
import type { ConsulNativeStatus } from '../lib/sync'
import { DynamicTls } from '../lib/tls'
import { StubAgent, caRoots, holdingOpen, issuedCert, recordingLogger, response } from './helpers/stub-agent'
import type { FakeEndpoint, RecordingLogger } from './helpers/stub-agent'

interface SyncError { watch: string, error: Error & { code?: string } }

interface Fixtures {
  ca: DevCertificateAuthority
  leaf: IssuedCert
  /** A second leaf of the same service (another key and serial). */
  leaf2: IssuedCert
  roots: IndexedCARoots
}

let fixturesOnce: Promise<Fixtures> | undefined
function fixtures (): Promise<Fixtures> {
  fixturesOnce ??= (async () => {
    const ca = await DevCertificateAuthority.create()
    return {
      ca,
      leaf: issuedCert(await ca.signLeaf('api'), 'api'),
      leaf2: issuedCert(await ca.signLeaf('api'), 'api'),
      roots: caRoots(ca)
    }
  })()
  return fixturesOnce
}

interface Harness {
  agent: StubAgent
  logger: RecordingLogger
  tls: DynamicTls
  sync: ConsulSync
  emitted: { tls: ConsulNativeStatus[], intentions: ConsulNativeStatus[], errors: SyncError[] }
}

function harness (t: Test, opts: Pick<ConsulNativeOptions, 'readyTimeout' | 'defaultPolicy'> = {}): Harness {
  const agent = new StubAgent()
  const logger = recordingLogger()
  const tls = new DynamicTls()
  // A start() that cannot finish fails the test after readyTimeout instead of hanging it.
  const options = resolveOptions({ service: 'api', readyTimeout: 4_000, defaultPolicy: 'deny', ...opts })
  const sync = new ConsulSync(options, agent.client, tls, logger.log)
  const emitted: Harness['emitted'] = { tls: [], intentions: [], errors: [] }
  sync.events.on('tls', (status: ConsulNativeStatus) => emitted.tls.push(status))
  sync.events.on('intentions', (status: ConsulNativeStatus) => emitted.intentions.push(status))
  sync.events.on('sync-error', (err: SyncError) => emitted.errors.push(err))
  t.teardown(() => sync.stop())
  return { agent, logger, tls, sync, emitted }
}

function intention (source: string, extra: Partial<Intention> = {}): Intention {
  return {
    SourceNS: 'default',
    SourceName: source,
    SourceType: 'consul',
    DestinationNS: 'default',
    DestinationName: 'api',
    Action: 'allow',
    Precedence: 9,
    CreateIndex: 1,
    ModifyIndex: 1,
    ...extra
  }
}

const serviceDefaults = (protocol: string | null): ServiceDefaultsView => ({ kind: 'service-defaults', name: 'api', protocol })
const proxyDefaults = (protocol: string | null): ProxyDefaultsView => ({ kind: 'proxy-defaults', name: 'global', protocol })
const meshEntry = (requestNormalization: MeshView['requestNormalization']): MeshView => ({ kind: 'mesh', requestNormalization })

interface FirstValues {
  leaf?: IssuedCert
  intentions?: Intention[]
  intentionsIndex?: number
  serviceDefaults?: ServiceDefaultsView | null
  proxyDefaults?: ProxyDefaultsView | null
  mesh?: MeshView | null
}

/** Gives every endpoint its first value (index 1 unless given). */
function serve (agent: StubAgent, f: Fixtures, values: FirstValues = {}): void {
  agent.leaf.set(values.leaf ?? f.leaf, 1)
  agent.roots.set(f.roots, 1)
  agent.intentions.set(values.intentions ?? [], values.intentionsIndex ?? 1)
  agent.entries['service-defaults'].set(values.serviceDefaults ?? null, 1)
  agent.entries['proxy-defaults'].set(values.proxyDefaults ?? null, 1)
  agent.entries.mesh.set(values.mesh ?? null, 1)
}

const caller = (service: string): { partition: string, namespace: string, service: string } => ({ partition: 'default', namespace: 'default', service })
const GET_ROOT = { method: 'GET', path: '/', url: '/', rawHeaders: [] }

function allows (policy: CompiledPolicy, source: string): boolean {
  return decide(policy, caller(source), GET_ROOT).allow
}

t.test('TLS material is installed only once both the leaf and the roots are known', async (t) => {
  const f = await fixtures()

  t.test('leaf first', async (t) => {
    const h = harness(t)
    serve(h.agent, f)
    h.agent.roots.forget() // no roots answer yet: polls are held
    const started = h.sync.start()
    await h.agent.leaf.poll(2) // the first leaf has been handled
    t.equal(h.tls.material, null, 'a leaf alone installs nothing')
    t.equal(h.emitted.tls.length, 0, 'and emits no tls event')
    t.match(h.sync.status(), { leaf: { serial: f.leaf.SerialNumber }, roots: null, trustDomain: null, ready: false })

    const installed = once(h.sync.events, 'tls')
    h.agent.roots.set(f.roots, 3)
    const [status] = await installed as [ConsulNativeStatus]
    t.same(h.tls.material, {
      certPem: f.leaf.CertPEM,
      keyPem: f.leaf.PrivateKeyPEM,
      rootPems: f.roots.Roots.map((root) => root.RootCert),
      intermediatePems: [],
      trustDomain: f.ca.trustDomain
    })
    t.match(status, { leaf: { serial: f.leaf.SerialNumber }, roots: { activeRootId: f.roots.ActiveRootID }, trustDomain: f.ca.trustDomain })
    await started
    t.equal(h.emitted.tls.length, 1)
    t.equal(h.sync.ready, true)
  })

  t.test('roots first', async (t) => {
    const h = harness(t)
    serve(h.agent, f)
    h.agent.leaf.forget() // no leaf answer yet: polls are held
    const started = h.sync.start()
    await h.agent.roots.poll(2) // the first roots have been handled
    t.equal(h.tls.material, null, 'roots alone install nothing')
    t.equal(h.emitted.tls.length, 0, 'and emit no tls event')
    t.match(h.sync.status(), { leaf: null, roots: { activeRootId: f.roots.ActiveRootID }, trustDomain: f.ca.trustDomain, ready: false })

    const installed = once(h.sync.events, 'tls')
    h.agent.leaf.set(f.leaf, 3)
    await installed
    t.equal(h.tls.material?.certPem, f.leaf.CertPEM)
    t.same(h.tls.material?.rootPems, f.roots.Roots.map((root) => root.RootCert))
    await started
    t.equal(h.emitted.tls.length, 1)
    t.equal(h.sync.ready, true)
  })
})

t.test('a leaf whose key does not match its certificate is rejected; the previous TLS material stays', async (t) => {
  const f = await fixtures()
  const h = harness(t)
  serve(h.agent, f)
  await h.sync.start()
  const before = h.tls.material
  t.equal(h.logger.events('tls-rotated').length, 0, 'the first installation is not logged as a rotation')

  const rejected = once(h.sync.events, 'sync-error')
  h.agent.leaf.set({ ...f.leaf2, PrivateKeyPEM: f.leaf.PrivateKeyPEM }, 2)
  const [{ watch, error }] = await rejected as [SyncError]
  t.equal(watch, 'leaf')
  t.type(error, Error)
  t.equal(h.tls.material, before, 'the material in force is unchanged')
  t.equal(h.sync.status().leaf?.serial, f.leaf.SerialNumber, 'status still reports the installed leaf')
  t.equal(h.sync.status().watches.leaf?.lastError, error.message)
  t.equal(h.emitted.tls.length, 1, 'no tls event for the rejected leaf')

  // The next good leaf is installed, and logged as a rotation.
  const installed = once(h.sync.events, 'tls')
  h.agent.leaf.set(f.leaf2, 3)
  await installed
  t.equal(h.tls.material?.certPem, f.leaf2.CertPEM)
  t.equal(h.tls.material?.keyPem, f.leaf2.PrivateKeyPEM)
  const rotated = h.logger.events('tls-rotated')
  t.equal(rotated.length, 1)
  t.match(rotated[0]?.obj.consulNative, {
    serial: f.leaf2.SerialNumber,
    validBefore: f.leaf2.ValidBefore,
    previousSerial: f.leaf.SerialNumber,
    previousValidBefore: f.leaf.ValidBefore,
    roots: 1,
    activeRootId: f.roots.ActiveRootID
  }, 'the old and the new serial and expiry')
  t.equal(h.sync.status().watches.leaf?.lastError, null, 'the accepted leaf clears the rejection')
})

t.test('a leaf that cannot be served is never put in force (docs/semantics.md#last-good)', async (t) => {
  const f = await fixtures()
  const uri = f.leaf.ServiceURI
  /** The leaf endpoint's answer for a certificate `ca` issues with these dates. */
  const leafFrom = async (ca: DevCertificateAuthority, serial: string, notBefore: Date, notAfter: Date, uris = [uri]): Promise<IssuedCert> => {
    const { certPem, privateKeyPem } = await ca.issueCertificate({ uris, notBefore, notAfter })
    return { ...f.leaf, SerialNumber: serial, CertPEM: certPem, PrivateKeyPEM: privateKeyPem, ValidAfter: notBefore.toISOString(), ValidBefore: notAfter.toISOString() }
  }
  const started = async (): Promise<Harness> => {
    const h = harness(t)
    serve(h.agent, f)
    await h.sync.start()
    return h
  }
  const HOUR = 3_600_000

  t.test('expired: rejected, the last good stays', async (t) => {
    const h = await started()
    const before = h.tls.material
    const rejected = once(h.sync.events, 'sync-error')
    h.agent.leaf.set(await leafFrom(f.ca, 'aa:01', new Date(Date.now() - 2 * HOUR), new Date(Date.now() - HOUR)), 2)
    const [{ watch, error }] = await rejected as [SyncError]
    t.equal(watch, 'leaf')
    t.match(error.message, /^the leaf \(serial aa:01\) expired at /)
    t.equal(h.tls.material, before)
    t.equal(h.sync.status().leaf?.serial, f.leaf.SerialNumber)
  })

  t.test('its certificate naming another SPIFFE ID than the answer says: rejected', async (t) => {
    const h = await started()
    const before = h.tls.material
    const rejected = once(h.sync.events, 'sync-error')
    const web = uri.replace(/\/svc\/api$/, '/svc/web')
    h.agent.leaf.set(await leafFrom(f.ca, 'aa:02', new Date(Date.now() - 60_000), new Date(Date.now() + HOUR), [web]), 2)
    const [{ error }] = await rejected as [SyncError]
    t.equal(error.message, `the leaf (serial aa:02) names ${web}, not its ServiceURI ${uri}`)
    t.equal(h.tls.material, before)

    const none = once(h.sync.events, 'sync-error')
    h.agent.leaf.set(await leafFrom(f.ca, 'aa:06', new Date(Date.now() - 60_000), new Date(Date.now() + HOUR), []), 4)
    t.equal((await none as [SyncError])[0].error.message, `the leaf (serial aa:06) names no SPIFFE ID, not its ServiceURI ${uri}`)

    // Certificate and ServiceURI agreeing, but on another service than the answer's Service says.
    const other = once(h.sync.events, 'sync-error')
    h.agent.leaf.set({ ...await leafFrom(f.ca, 'aa:05', new Date(Date.now() - 60_000), new Date(Date.now() + HOUR), [web]), ServiceURI: web }, 5)
    const [{ error: otherError }] = await other as [SyncError]
    t.equal(otherError.message, `the leaf (serial aa:05) is for ${web}, not for service api`)
    t.equal(h.tls.material, before)
  })

  t.test('not valid yet: held, and put in force once valid', async (t) => {
    const h = await started()
    const before = h.tls.material
    const notBefore = new Date(Math.ceil((Date.now() + 1_500) / 1000) * 1000)
    const early = await leafFrom(f.ca, 'aa:03', notBefore, new Date(notBefore.getTime() + HOUR))
    h.agent.leaf.set(early, 2)
    await h.agent.leaf.poll(3)
    t.equal(h.tls.material, before, 'held while not valid')
    t.same(h.emitted.errors, [], 'nothing wrong to say yet')
    // The hold's timer does not keep a process alive (a server does): this test's must.
    const alive = setTimeout(() => {}, 5_000)
    await once(h.sync.events, 'tls')
    clearTimeout(alive)
    t.ok(Date.now() >= notBefore.getTime(), 'put in force once valid')
    t.equal(h.tls.material?.certPem, early.CertPEM)
    t.equal(h.sync.status().leaf?.serial, 'aa:03')
  })

  t.test('its key is another\'s: rejected at once, even when it would be held', async (t) => {
    const h = await started()
    const before = h.tls.material
    const notBefore = new Date(Math.ceil((Date.now() + 60_000) / 1000) * 1000)
    const early = await leafFrom(f.ca, 'aa:04', notBefore, new Date(notBefore.getTime() + HOUR))
    const rejected = once(h.sync.events, 'sync-error')
    h.agent.leaf.set({ ...early, PrivateKeyPEM: f.leaf.PrivateKeyPEM }, 2)
    const [{ watch, error }] = await rejected as [SyncError]
    t.equal(watch, 'leaf')
    t.equal(error.message, 'the leaf\'s (serial aa:04) private key does not belong to its certificate')
    t.equal(h.tls.material, before)
  })

  t.test('held, then refused by TLS when the roots that sign it come: dropped and said; the roots go in force', async (t) => {
    const h = await started()
    const rotated = await DevCertificateAuthority.create({ clusterId: f.ca.clusterId })
    const weak = issuedCert(await rotated.signLeaf('api'), 'api')
    const signed = { serialNumber: weak.SerialNumber }
    // What OpenSSL says of a certificate it will not serve (a key too small for its security level).
    const update = h.tls.update.bind(h.tls)
    h.tls.update = (material) => {
      if (material.certPem === weak.CertPEM) throw new Error('error:0A00018F:SSL routines::ee key too small')
      update(material)
    }
    h.agent.leaf.set(weak, 2)
    await h.agent.leaf.poll(3)
    t.equal(h.tls.material?.certPem, f.leaf.CertPEM, 'held')
    const dropped = once(h.sync.events, 'sync-error')
    const installed = once(h.sync.events, 'tls')
    h.agent.roots.set(caRoots(rotated), 2)
    const [{ watch, error }] = await dropped as [SyncError]
    await installed
    t.equal(watch, 'leaf', 'the leaf\'s failure, not the roots\'')
    t.match(h.logger.events('leaf-held'), [{ level: 'error', obj: { consulNative: { serial: signed.serialNumber, reason: error.message } } }])
    t.same(h.tls.material?.rootPems, rotated.roots().map((root) => root.RootCert), 'the roots are in force')
    t.equal(h.tls.material?.certPem, f.leaf.CertPEM, 'with the last good leaf')
    t.equal(h.sync.status().watches.roots?.lastError, null)
    t.equal(h.sync.status().watches.leaf?.lastError, error.message, 'said until a later leaf')
  })

  t.test('held until it expired: dropped when the roots come, and said as expired', async (t) => {
    const h = await started()
    const rotated = await DevCertificateAuthority.create({ clusterId: f.ca.clusterId })
    const brief = await leafFrom(rotated, 'aa:08', new Date(Date.now() - 60_000), new Date(Math.ceil((Date.now() + 1_000) / 1000) * 1000))
    h.agent.leaf.set(brief, 2)
    await h.agent.leaf.poll(3)
    await new Promise((resolve) => setTimeout(resolve, Date.parse(brief.ValidBefore) - Date.now() + 50))
    const dropped = once(h.sync.events, 'sync-error')
    h.agent.roots.set(caRoots(rotated), 2)
    const [{ error }] = await dropped as [SyncError]
    t.match(error.message, /^the leaf \(serial aa:08\) expired at /)
    t.equal(h.tls.material?.certPem, f.leaf.CertPEM, 'the last good leaf')
  })

  t.test('neither roots nor held leaves arriving again and again put off the report; said once', async (t) => {
    const saved = syncTimings.heldLeafReportMs
    syncTimings.heldLeafReportMs = 1_000
    t.teardown(() => { syncTimings.heldLeafReportMs = saved })
    const h = await started()
    const others = await Promise.all([1, 2].map(async () => await DevCertificateAuthority.create({ clusterId: f.ca.clusterId })))
    const foreign = await DevCertificateAuthority.create({ clusterId: f.ca.clusterId })
    const alive = setTimeout(() => {}, 10_000)
    const reported = once(h.sync.events, 'sync-error')
    const startedAt = Date.now()
    let index = 2
    // A new roots answer and a new unservable leaf as often as the watches take them (more often than the report wait).
    const churn = setInterval(() => {
      h.agent.roots.set(caRoots(others[index % 2] as DevCertificateAuthority), index)
      foreign.signLeaf('api').then((signed) => { h.agent.leaf.set(issuedCert(signed, 'api'), index++) }, t.error)
    }, 100)
    setTimeout(() => { clearInterval(churn) }, 4_000).unref()
    await reported
    clearInterval(churn)
    clearTimeout(alive)
    const waited = Date.now() - startedAt
    t.ok(waited < 2_000, `reported ${waited} ms after the first hold, not put off`)
    t.ok(h.agent.leaf.polls.length > 2, 'several leaves came meanwhile')
    await new Promise((resolve) => setTimeout(resolve, 300))
    t.equal(h.logger.events('leaf-held').length, 1, 'said once for the whole period')
    t.equal(h.tls.material?.certPem, f.leaf.CertPEM, 'the last good leaf serves on')
  })

  t.test('at the start, a first leaf TLS refuses when the roots come: dropped, the roots kept; a good leaf then makes it ready', async (t) => {
    const h = harness(t)
    serve(h.agent, f)
    h.agent.roots.forget() // the leaf comes first
    const update = h.tls.update.bind(h.tls)
    h.tls.update = (material) => {
      if (material.certPem === f.leaf.CertPEM) throw new Error('error:0A00018F:SSL routines::ee key too small')
      update(material)
    }
    const starting = h.sync.start()
    await h.agent.leaf.poll(2)
    const dropped = once(h.sync.events, 'sync-error')
    h.agent.roots.set(f.roots, 3)
    const [{ watch }] = await dropped as [SyncError]
    t.equal(watch, 'leaf')
    t.equal(h.sync.status().leaf, null, 'no leaf in force, none shown')
    t.equal(h.sync.status().roots?.activeRootId, f.roots.ActiveRootID, 'the roots are kept')
    t.match(h.logger.events('leaf-held'), [{ level: 'error', msg: /new leaf dropped, and none is in force yet: / }])
    h.agent.leaf.set(f.leaf2, 4)
    await starting
    t.equal(h.sync.ready, true)
    t.equal(h.tls.material?.certPem, f.leaf2.CertPEM)
  })

  t.test('a renewal held back counts as one the agent cannot give: the expiry alarm sounds', async (t) => {
    const h = await started()
    const rotated = await DevCertificateAuthority.create({ clusterId: f.ca.clusterId })
    h.agent.leaf.set(issuedCert(await rotated.signLeaf('api'), 'api'), 2)
    await h.agent.leaf.poll(3)
    h.sync.checkExpiry(Date.parse(f.leaf.ValidBefore) - 5 * 60_000)
    t.match(h.logger.events('leaf-expiring'), [{ level: 'error', obj: { consulNative: { serial: f.leaf.SerialNumber, cause: /does not chain to the CA roots in force$/ } } }])
  })

  t.test('not signed by the roots in force: held until roots that sign it arrive (a rotation in that order)', async (t) => {
    const h = await started()
    const before = h.tls.material
    // The same cluster, so the same trust domain: a new root, as after a rotation.
    const rotated = await DevCertificateAuthority.create({ clusterId: f.ca.clusterId })
    const next = issuedCert(await rotated.signLeaf('api'), 'api')
    h.agent.leaf.set(next, 2)
    await h.agent.leaf.poll(3)
    t.equal(h.tls.material, before, 'held: the roots in force do not sign it')
    // Roots that do not sign it either are put in force (a root withdrawn); the leaf waits on.
    const unrelated = await DevCertificateAuthority.create({ clusterId: f.ca.clusterId })
    const withdrawn = once(h.sync.events, 'tls')
    h.agent.roots.set(caRoots(unrelated), 2)
    await withdrawn
    t.equal(h.tls.material?.certPem, f.leaf.CertPEM, 'the leaf in force stays')
    t.same(h.tls.material?.rootPems, unrelated.roots().map((root) => root.RootCert))
    const installed = once(h.sync.events, 'tls')
    h.agent.roots.set(caRoots(rotated), 3)
    await installed
    t.equal(h.tls.material?.certPem, next.CertPEM, 'put in force with the roots that sign it')
    t.same(h.tls.material?.rootPems, rotated.roots().map((root) => root.RootCert))
    t.same(h.emitted.errors, [], 'a short wait is not reported')
    t.equal(h.logger.events('leaf-held').length, 0)
  })

  t.test('held for long: reported once, in status() too; a newer good leaf replaces it', async (t) => {
    const saved = syncTimings.heldLeafReportMs
    syncTimings.heldLeafReportMs = 50
    t.teardown(() => { syncTimings.heldLeafReportMs = saved })
    const h = await started()
    const before = h.tls.material
    const foreign = await DevCertificateAuthority.create({ clusterId: f.ca.clusterId })
    const reported = once(h.sync.events, 'sync-error')
    h.agent.leaf.set(issuedCert(await foreign.signLeaf('api'), 'api'), 2)
    const alive = setTimeout(() => {}, 5_000)
    const [{ watch, error }] = await reported as [SyncError]
    clearTimeout(alive)
    t.equal(watch, 'leaf')
    t.match(error.message, /does not chain to the CA roots in force$/)
    t.equal(h.sync.status().watches.leaf?.lastError, error.message)
    t.match(h.logger.events('leaf-held'), [{ level: 'warn', obj: { consulNative: { reason: error.message } } }])
    await new Promise((resolve) => setTimeout(resolve, 150))
    t.equal(h.logger.events('leaf-held').length, 1, 'said once')
    t.equal(h.tls.material, before, 'the last good leaf stays in force')

    const installed = once(h.sync.events, 'tls')
    h.agent.leaf.set(f.leaf2, 3)
    await installed
    t.equal(h.tls.material?.certPem, f.leaf2.CertPEM)
    t.equal(h.sync.status().watches.leaf?.lastError, null, 'nothing held any more')
  })

  t.test('not valid for longer than the report wait: reported once, then put in force once valid', async (t) => {
    const saved = syncTimings.heldLeafReportMs
    syncTimings.heldLeafReportMs = 50
    t.teardown(() => { syncTimings.heldLeafReportMs = saved })
    const h = await started()
    const notBefore = new Date(Math.ceil((Date.now() + 1_000) / 1000) * 1000)
    const early = await leafFrom(f.ca, 'aa:07', notBefore, new Date(notBefore.getTime() + HOUR))
    const alive = setTimeout(() => {}, 5_000)
    // Between the report and the leaf's start the hold sleeps: it does not spin on short timers.
    let timers = 0
    const setTimer = globalThis.setTimeout
    globalThis.setTimeout = ((...args: Parameters<typeof setTimeout>) => { timers++; return setTimer(...args) }) as typeof setTimeout
    t.teardown(() => { globalThis.setTimeout = setTimer })
    const installed = once(h.sync.events, 'tls')
    h.agent.leaf.set(early, 2)
    await installed
    globalThis.setTimeout = setTimer
    clearTimeout(alive)
    t.ok(timers < 30, `${timers} timers in about a second`)
    t.equal(h.tls.material?.certPem, early.CertPEM)
    t.match(h.logger.events('leaf-held'), [{ obj: { consulNative: { serial: 'aa:07', reason: /is not valid before/ } } }], 'reported once while it waited')
    t.equal(h.sync.status().watches.leaf?.lastError, null, 'in force: nothing held')
  })

  t.test('at the start, a first leaf the first roots do not sign: not ready, and the readyTimeout says why', async (t) => {
    const saved = syncTimings.heldLeafReportMs
    syncTimings.heldLeafReportMs = 100
    t.teardown(() => { syncTimings.heldLeafReportMs = saved })
    const foreign = await DevCertificateAuthority.create({ clusterId: f.ca.clusterId })
    const h = harness(t, { readyTimeout: 300 })
    serve(h.agent, f, { leaf: issuedCert(await foreign.signLeaf('api'), 'api') })
    const err = await h.sync.start().then(() => null, (e: unknown) => e as Error & { code?: string })
    t.match(h.logger.events('leaf-held'), [{ level: 'warn', msg: /new leaf not in force, and none is yet: / }], 'reported, saying no leaf is in force')
    t.equal(err?.code, 'FST_CONSUL_NATIVE_NOT_READY')
    t.match(err?.message, /^Consul agent not ready after 300ms: leaf: the leaf \(serial [0-9a-f:]+\) does not chain to the CA roots in force$/)
    t.equal(h.tls.material, null, 'nothing in force')
  })

  t.test('roots are taken as the agent gives them, also when their active root names another trust domain (Consul does not check it either)', async (t) => {
    const h = await started()
    const installed = once(h.sync.events, 'tls')
    h.agent.roots.set({ ...f.roots, TrustDomain: 'other.consul' }, 2)
    await installed
    t.equal(h.sync.status().trustDomain, 'other.consul')
    t.same(h.emitted.errors, [])
  })
})

t.test('checkExpiry warns only when the leaf nears expiry and the agent cannot renew it', async (t) => {
  const f = await fixtures()
  const h = harness(t)
  const validAfter = Date.parse(f.leaf.ValidAfter)
  const validBefore = Date.parse(f.leaf.ValidBefore)
  h.sync.checkExpiry(validBefore - 60_000)
  t.same(h.logger.events('leaf-expiring'), [], 'nothing to say before any leaf is known')

  serve(h.agent, f)
  await h.sync.start()
  h.sync.checkExpiry(validBefore - 60_000)
  t.same(h.logger.events('leaf-expiring'), [], 'no warning while the leaf watch is healthy, however close the expiry')

  const failed = once(h.sync.events, 'sync-error')
  h.agent.leaf.fail(new Error('connect ECONNREFUSED 127.0.0.1:8500'))
  const [{ watch }] = await failed as [SyncError]
  t.equal(watch, 'leaf')
  t.ok((h.sync.status().watches.leaf?.failures ?? 0) > 0, 'the leaf watch is failing')

  h.sync.checkExpiry(validAfter + (validBefore - validAfter) / 2)
  t.same(h.logger.events('leaf-expiring'), [], 'no warning with half the lifetime left')

  h.sync.checkExpiry(validBefore - 10 * 60_000)
  const warnings = h.logger.events('leaf-expiring')
  t.equal(warnings.length, 1, 'a warning once less than 20% of the lifetime is left')
  t.equal(warnings[0]?.level, 'error')
  t.same(warnings[0]?.obj.consulNative, {
    event: 'leaf-expiring',
    serial: f.leaf.SerialNumber,
    validBefore: f.leaf.ValidBefore,
    msLeft: 10 * 60_000,
    cause: 'connect ECONNREFUSED 127.0.0.1:8500'
  })
  t.match(warnings[0]?.msg, /expires in 10 minutes and the agent cannot renew it/)

  h.sync.checkExpiry(validBefore + 5 * 60_000)
  t.match(h.logger.events('leaf-expiring')[1]?.msg, /expires in 0 minutes/, 'an expired leaf counts as 0 minutes left')
})

t.test('checkExpiry also warns when the agent answers but every new leaf is rejected', async (t) => {
  const f = await fixtures()
  const h = harness(t)
  serve(h.agent, f)
  await h.sync.start()
  const rejected = once(h.sync.events, 'sync-error')
  h.agent.leaf.set({ ...f.leaf, SerialNumber: 'ff', PrivateKeyPEM: f.leaf2.PrivateKeyPEM }, 2)
  await rejected
  t.equal(h.sync.status().watches.leaf?.failures, 0, 'the polls themselves succeed')
  h.sync.checkExpiry(Date.parse(f.leaf.ValidBefore) - 60_000)
  t.equal(h.logger.events('leaf-expiring').length, 1)
})

interface IntervalRecord { fn: () => void, ms: number | undefined, timer: NodeJS.Timeout }

/** Records setInterval/clearInterval (still running the real ones) until the test ends. */
function recordIntervals (t: Test): { set: IntervalRecord[], cleared: unknown[] } {
  const realSet = globalThis.setInterval
  const realClear = globalThis.clearInterval
  const record: { set: IntervalRecord[], cleared: unknown[] } = { set: [], cleared: [] }
  globalThis.setInterval = ((fn: () => void, ms?: number) => {
    const timer = realSet(fn, ms)
    record.set.push({ fn, ms, timer })
    return timer
  }) as unknown as typeof setInterval
  globalThis.clearInterval = ((timer: NodeJS.Timeout | undefined) => {
    record.cleared.push(timer)
    realClear(timer)
  }) as typeof clearInterval
  t.teardown(() => {
    globalThis.setInterval = realSet
    globalThis.clearInterval = realClear
  })
  return record
}

t.test('start() schedules the expiry check every minute and stop() cancels it', async (t) => {
  // signLeaf backdates a leaf by one minute: a 70 s leaf has at most 10 s of its 70 s left (< 20%).
  const ca = await DevCertificateAuthority.create({ leafTTLms: 70_000 })
  const leaf = issuedCert(await ca.signLeaf('api'), 'api')
  const intervals = recordIntervals(t)
  const h = harness(t)
  h.agent.leaf.set(leaf, 1)
  h.agent.roots.set(caRoots(ca), 1)
  h.agent.intentions.set([], 1)
  for (const endpoint of Object.values(h.agent.entries) as Array<FakeEndpoint<unknown>>) endpoint.set(null, 1)
  await h.sync.start()

  const checks = intervals.set.filter((interval) => interval.ms === 60_000)
  t.equal(checks.length, 1, 'one expiry check, every 60 s')
  const check = checks[0] as IntervalRecord
  t.equal(check.timer.hasRef(), false, 'the check does not keep the process alive')

  const failed = once(h.sync.events, 'sync-error')
  h.agent.leaf.fail(new Error('agent gone'))
  await failed
  check.fn()
  const warnings = h.logger.events('leaf-expiring')
  t.equal(warnings.length, 1, 'the scheduled check warns about the expiring leaf')
  t.equal(warnings[0]?.obj.consulNative?.serial, leaf.SerialNumber)

  h.sync.stop()
  t.same(intervals.cleared.filter((timer) => timer === check.timer).length, 1, 'stop() clears the check')
})

t.test('readyTimeout: NotReadyError names every missing watch with its last error', async (t) => {
  const f = await fixtures()
  const h = harness(t, { readyTimeout: 50 })
  const refused = new Error('connect ECONNREFUSED 127.0.0.1:8500')
  h.agent.leaf.set(f.leaf, 1)
  h.agent.roots.fail(refused)
  // intentions never answers
  for (const endpoint of Object.values(h.agent.entries) as Array<FakeEndpoint<unknown>>) endpoint.set(null, 1)

  const err = await h.sync.start().then(() => null, (e: unknown) => e as Error & { code?: string })
  t.equal(err?.code, 'FST_CONSUL_NATIVE_NOT_READY')
  t.equal(err?.message, 'Consul agent not ready after 50ms: roots: connect ECONNREFUSED 127.0.0.1:8500; intentions: no answer yet',
    'the watches that have a value are not named')
  t.equal(err?.cause, refused, 'the first missing watch\'s error is the cause')
  t.equal(h.agent.intentions.held, 0, 'start() stops the sync: the held poll is ended')
  t.equal(h.agent.intentions.aborted, 1)
})

t.test('readyTimeout with a silent agent: every watch is named, and there is no cause', async (t) => {
  const h = harness(t, { readyTimeout: 50 })
  const err = await h.sync.start().then(() => null, (e: unknown) => e as Error & { code?: string })
  t.equal(err?.code, 'FST_CONSUL_NATIVE_NOT_READY')
  t.equal(err?.message, 'Consul agent not ready after 50ms: leaf: no answer yet; roots: no answer yet; intentions: no answer yet; ' +
    'service-defaults: no answer yet; proxy-defaults: no answer yet; mesh: no answer yet')
  t.equal(err?.cause, undefined)
  t.same(h.agent.endpoints.map((endpoint) => [endpoint.name, endpoint.held, endpoint.aborted]),
    h.agent.endpoints.map((endpoint) => [endpoint.name, 0, 1]), 'every held poll was ended')
})

t.test('policy warnings are logged once per distinct cause across recompiles', async (t) => {
  const f = await fixtures()
  const h = harness(t)
  const peered = intention('web', { SourcePeer: 'other-cluster' })
  serve(h.agent, f, { intentions: [peered], intentionsIndex: 10 })
  await h.sync.start()
  const warned = (): string[] => h.logger.events('intention-unsupported').map((entry) => String(entry.obj.consulNative?.reason))
  t.equal(warned().length, 1)
  t.match(warned()[0], /SourcePeer/)
  t.equal(h.logger.entries.find((entry) => entry.obj.consulNative?.event === 'intention-unsupported')?.level, 'warn')

  // Recompiles for a protocol change and for a changed list that still holds the peered intention.
  let recompiled = once(h.sync.events, 'intentions')
  h.agent.entries['service-defaults'].set(serviceDefaults('http'), 2)
  await recompiled
  recompiled = once(h.sync.events, 'intentions')
  h.agent.intentions.set([peered, intention('db')], 11)
  await recompiled
  t.equal(warned().length, 1, 'the same cause is not logged again')

  // A new cause is logged, once.
  const jwt = intention('batch', { JWT: { Providers: [{ Name: 'okta' }] } })
  recompiled = once(h.sync.events, 'intentions')
  h.agent.intentions.set([peered, intention('db'), jwt], 12)
  await recompiled
  recompiled = once(h.sync.events, 'intentions')
  h.agent.entries['service-defaults'].set(serviceDefaults('tcp'), 3)
  await recompiled
  t.equal(warned().length, 2)
  t.match(warned()[1], /require a JWT but the service protocol "tcp" is not HTTP-like/)
  // 3 compiles at start-up (intentions, service-defaults, proxy-defaults) and 4 updates.
  t.equal(h.logger.events('policy-updated').length, 7, 'the policy did recompile each time')
})

t.test('an intention update that cannot be compiled keeps the last good policy; a later good one is accepted', async (t) => {
  const f = await fixtures()
  const h = harness(t)
  serve(h.agent, f, { intentions: [intention('web')], intentionsIndex: 10, serviceDefaults: serviceDefaults('http') })
  await h.sync.start()
  const good = h.sync.policy
  t.equal(allows(good, 'web'), true)

  const rejected = once(h.sync.events, 'sync-error')
  h.agent.intentions.set([intention('web', { Action: undefined, Permissions: [{ Action: 'allow', HTTP: { PathRegex: '(' } }] })], 11)
  const [{ watch, error }] = await rejected as [SyncError]
  t.equal(watch, 'intentions')
  t.equal(error.code, 'FST_CONSUL_NATIVE_INVALID_INTENTIONS')
  t.equal(h.sync.policy, good, 'the last good policy stays in force')
  t.match(h.sync.status(), { intentions: { count: 1, index: 10 }, watches: { intentions: { lastError: error.message } } })
  t.equal(h.emitted.intentions.filter((status) => status.intentions?.index === 11).length, 0, 'no intentions event for it')

  const accepted = once(h.sync.events, 'intentions')
  h.agent.intentions.set([intention('web', { Action: 'deny' }), intention('db')], 12)
  const [status] = await accepted as [ConsulNativeStatus]
  t.match(status.intentions, { count: 2, index: 12 })
  t.not(h.sync.policy, good)
  t.equal(allows(h.sync.policy, 'web'), false, 'the new policy is in force')
  t.equal(allows(h.sync.policy, 'db'), true)
  t.equal(h.sync.status().watches.intentions?.lastError, null)
})

t.test("defaultPolicy 'agent' is resolved from the agent before any watch starts", async (t) => {
  const f = await fixtures()
  const self = (defaultIntentionPolicy: 'allow' | 'deny' | null, aclDefaultPolicy: 'allow' | 'deny' | null): AgentSelfView =>
    ({ datacenter: 'dc1', version: '1.21.0', defaultIntentionPolicy, aclDefaultPolicy, aclsEnabled: aclDefaultPolicy !== null })
  const cases: Array<[string, AgentSelfView, 'allow' | 'deny' | null, boolean]> = [
    ['default_intention_policy allow wins over the ACL default and the header', self('allow', 'deny'), 'deny', true],
    ['default_intention_policy deny wins over the ACL default and the header', self('deny', 'allow'), 'allow', false],
    ['then the ACL default policy (allow)', self(null, 'allow'), 'deny', true],
    ['then the ACL default policy (deny)', self(null, 'deny'), 'allow', false],
    ['then the X-Consul-Default-ACL-Policy header (allow)', self(null, null), 'allow', true],
    ['then the X-Consul-Default-ACL-Policy header (deny)', self(null, null), 'deny', false],
    ['nothing known: deny', self(null, null), null, false]
  ]
  for (const [name, body, header, allow] of cases) {
    t.test(name, async (t) => {
      const h = harness(t, { defaultPolicy: 'agent' })
      h.agent.agentSelf = async () => response(body, null, header)
      serve(h.agent, f)
      await h.sync.start()
      t.equal(h.sync.status().intentions?.defaultAllow, allow)
      t.equal(allows(h.sync.policy, 'unknown'), allow, 'an unmatched caller gets the default')
      t.equal(h.agent.requests[0], 'agentSelf', 'asked before any watch polls')
      t.equal(h.agent.requests.filter((request) => request === 'agentSelf').length, 1)
      t.same(h.logger.events('default-policy-unknown'), [])
    })
  }

  // Everything else waits for the default policy, and a not-ready message names it all.
  const WAITING = 'waiting for it: leaf, roots, intentions, service-defaults, proxy-defaults, mesh, jwt-providers'
  const refusal = (): Error => withAgentStatus(new Error('Consul agent answered GET /v1/agent/self with 403: Permission denied'), 403)

  t.test('agentSelf refused (403): deny, with a warning', async (t) => {
    const h = harness(t, { defaultPolicy: 'agent' })
    h.agent.agentSelf = async () => { throw refusal() }
    serve(h.agent, f)
    await h.sync.start()
    t.equal(h.sync.status().intentions?.defaultAllow, false)
    t.equal(allows(h.sync.policy, 'unknown'), false)
    const warnings = h.logger.events('default-policy-unknown')
    t.equal(warnings.length, 1)
    t.equal(warnings[0]?.level, 'warn')
    t.equal(warnings[0]?.obj.consulNative?.reason, 'Consul agent answered GET /v1/agent/self with 403: Permission denied')
  })

  for (const header of ['allow', 'deny', null] as const) {
    t.test(`agentSelf refused: the header of another answer decides (${String(header)})`, async (t) => {
      const h = harness(t, { defaultPolicy: 'agent' })
      h.agent.agentSelf = async () => { throw refusal() }
      serve(h.agent, f)
      h.agent.roots.defaultAclPolicy = header
      await h.sync.start()
      t.equal(h.sync.status().intentions?.defaultAllow, header === 'allow')
      t.match(h.logger.events('default-policy-unknown')[0], { obj: { consulNative: { header } }, msg: header === 'allow' ? /header says allow/ : /denying by default/ })
    })
  }

  t.test('agentSelf refused and the header lookup failing once: asked again, the header decides', async (t) => {
    const h = harness(t, { defaultPolicy: 'agent' })
    h.agent.agentSelf = async () => { throw refusal() }
    serve(h.agent, f)
    h.agent.roots.defaultAclPolicy = 'deny'
    // The first roots call is the header lookup (no watch has started yet): it fails.
    const endpoint = h.agent.roots as unknown as { handle: (q: unknown) => Promise<unknown> }
    const handle = endpoint.handle.bind(endpoint)
    let calls = 0
    endpoint.handle = async (q) => (++calls === 1 ? await Promise.reject(new Error('connect ECONNREFUSED')) : await handle(q))
    await h.sync.start()
    t.equal(h.sync.status().intentions?.defaultAllow, false)
    t.match(h.logger.events('default-policy-unknown')[0], { obj: { consulNative: { header: 'deny' } } })
  })

  // An agent restarting, or answering 5xx, is asked again: taking the ACL default header instead
  // would allow by default for good where the agent's own setting is deny and ACLs are off.
  for (const [what, failure] of [
    ['a 500', () => withAgentStatus(new Error('Consul agent answered GET /v1/agent/self with 500: rpc error'), 500)],
    ['no answer', () => new Error('connect ECONNREFUSED 127.0.0.1:8500')]
  ] as const) {
    t.test(`agentSelf failing with ${what} is asked again, never replaced by the header`, async (t) => {
      const h = harness(t, { defaultPolicy: 'agent' })
      let calls = 0
      h.agent.agentSelf = async () => {
        if (++calls <= 2) throw failure()
        return response(self('deny', null), null, 'allow')
      }
      serve(h.agent, f)
      h.agent.roots.defaultAclPolicy = 'allow'
      await h.sync.start()
      t.equal(calls, 3, 'asked until it answered')
      t.equal(h.sync.status().intentions?.defaultAllow, false, 'the agent\'s deny, not the allow header')
      t.equal(allows(h.sync.policy, 'unknown'), false)
      t.same(h.logger.events('default-policy-unknown'), [], 'it was known in the end')
    })
  }

  t.test('agentSelf failing until readyTimeout: not ready, naming the failure', async (t) => {
    const h = harness(t, { defaultPolicy: 'agent', readyTimeout: 400 })
    const failure = withAgentStatus(new Error('Consul agent answered GET /v1/agent/self with 503: No cluster leader'), 503)
    h.agent.agentSelf = async () => { throw failure }
    serve(h.agent, f)
    h.agent.roots.defaultAclPolicy = 'allow'
    const err = await h.sync.start().then(() => null, (e: unknown) => e as Error & { code?: string })
    t.equal(err?.code, 'FST_CONSUL_NATIVE_NOT_READY')
    t.equal(err?.message, `Consul agent not ready after 400ms: agent/self (default intention policy): ${failure.message}; ${WAITING}`)
    t.ok(h.agent.requests.filter((request) => request === 'agentSelf').length >= 2, 'asked more than once')
  })

  t.test('readyTimeout while agentSelf has not answered names it', async (t) => {
    const h = harness(t, { defaultPolicy: 'agent', readyTimeout: 50 })
    serve(h.agent, f)
    const err = await h.sync.start().then(() => null, (e: unknown) => e as Error & { code?: string })
    t.equal(err?.code, 'FST_CONSUL_NATIVE_NOT_READY')
    t.equal(err?.message, `Consul agent not ready after 50ms: agent/self (default intention policy): no answer yet; ${WAITING}`)
    t.same(h.agent.requests, ['agentSelf'], 'no watch started')
  })

  t.test('stop() during startup aborts the agent/self call', async (t) => {
    const h = harness(t, { defaultPolicy: 'agent', readyTimeout: 50 })
    let aborted = false
    h.agent.agentSelf = async (signal) => await new Promise((_resolve, reject) => {
      signal?.addEventListener('abort', () => { aborted = true; reject(new Error('aborted')) })
    })
    const err = await h.sync.start().then(() => null, (e: unknown) => e as Error & { code?: string })
    t.equal(err?.code, 'FST_CONSUL_NATIVE_NOT_READY')
    t.equal(aborted, true)
    t.same(h.agent.requests, ['agentSelf'], 'no header lookup after the abort')
  })

  t.test('readyTimeout after agentSelf failed and the header lookup hangs names the failure', async (t) => {
    const h = harness(t, { defaultPolicy: 'agent', readyTimeout: 50 })
    const refused = refusal()
    h.agent.agentSelf = async () => { throw refused }
    const err = await h.sync.start().then(() => null, (e: unknown) => e as Error & { code?: string })
    t.equal(err?.message, `Consul agent not ready after 50ms: agent/self (default intention policy): ${refused.message}; ${WAITING}`)
    t.equal(err?.cause, refused)
  })

  for (const fixed of ['allow', 'deny'] as const) {
    t.test(`defaultPolicy '${fixed}' is used as given, without asking the agent`, async (t) => {
      const h = harness(t, { defaultPolicy: fixed })
      serve(h.agent, f)
      await h.sync.start()
      t.equal(h.sync.status().intentions?.defaultAllow, fixed === 'allow')
      t.notOk(h.agent.requests.includes('agentSelf'))
    })
  }
})

t.test('protocol: service-defaults, then proxy-defaults, then tcp; an empty protocol counts as unset', async (t) => {
  const f = await fixtures()
  const cases: Array<[ServiceDefaultsView | null, ProxyDefaultsView | null, string]> = [
    [serviceDefaults('http'), proxyDefaults('grpc'), 'http'],
    [serviceDefaults('grpc'), null, 'grpc'],
    [null, proxyDefaults('grpc'), 'grpc'],
    [serviceDefaults(null), proxyDefaults('http2'), 'http2'],
    [serviceDefaults(''), proxyDefaults('http2'), 'http2'],
    [serviceDefaults(''), proxyDefaults(''), 'tcp'],
    [null, proxyDefaults(null), 'tcp'],
    [null, null, 'tcp']
  ]
  for (const [sd, pd, expected] of cases) {
    t.test(`service-defaults ${JSON.stringify(sd?.protocol)}, proxy-defaults ${JSON.stringify(pd?.protocol)} → ${expected}`, async (t) => {
      const h = harness(t)
      serve(h.agent, f, { serviceDefaults: sd, proxyDefaults: pd })
      await h.sync.start()
      t.equal(h.sync.status().intentions?.protocol, expected)
    })
  }

  t.test('a later change of either entry recompiles with the resolved protocol', async (t) => {
    const h = harness(t)
    serve(h.agent, f, { proxyDefaults: proxyDefaults('grpc') })
    await h.sync.start()
    const steps: Array<[() => void, string]> = [
      [() => h.agent.entries['service-defaults'].set(serviceDefaults('http'), 2), 'http'],
      [() => h.agent.entries['proxy-defaults'].set(proxyDefaults(''), 2), 'http'],
      [() => h.agent.entries['service-defaults'].set(null, 3), 'tcp'],
      [() => h.agent.entries['proxy-defaults'].set(proxyDefaults('http2'), 3), 'http2']
    ]
    for (const [change, expected] of steps) {
      const recompiled = once(h.sync.events, 'intentions')
      change()
      const [status] = await recompiled as [ConsulNativeStatus]
      t.equal(status.intentions?.protocol, expected)
    }
  })
})

t.test('status() before and after start()', async (t) => {
  const f = await fixtures()
  const h = harness(t)
  const idle = { lastSuccess: null, lastError: null, failures: 0 }
  t.same(h.sync.status(), {
    ready: false,
    service: 'api',
    trustDomain: null,
    leaf: null,
    roots: null,
    intentions: null,
    watches: { leaf: idle, roots: idle, intentions: idle, 'service-defaults': idle, 'proxy-defaults': idle, mesh: idle, 'jwt-providers': idle },
    registration: null,
    enforcement: { mode: 'enforce', routes: {} },
    candidate: null
  })
  t.equal(allows(h.sync.policy, 'web'), false, 'before any sync the policy denies everyone')
  t.equal(h.sync.normalization, null)
  t.equal(h.sync.ready, false)

  serve(h.agent, f, { intentions: [intention('web')], intentionsIndex: 10 })
  h.agent.entries.mesh.forget() // mesh answers last
  const started = h.sync.start()
  await Promise.all(h.agent.endpoints.filter((endpoint) => endpoint.name !== 'mesh').map(async (endpoint) => await endpoint.poll(2)))
  const eventsBefore = h.emitted.intentions.length
  h.agent.entries.mesh.set(meshEntry({ MergeSlashes: true }), 4)
  await started
  t.equal(h.emitted.intentions.length, eventsBefore, 'the first mesh value is part of start-up: no intentions event')

  const status = h.sync.status()
  t.same({ ...status, watches: undefined }, {
    ready: true,
    service: 'api',
    trustDomain: f.ca.trustDomain,
    leaf: { serial: f.leaf.SerialNumber, validAfter: f.leaf.ValidAfter, validBefore: f.leaf.ValidBefore, uri: f.leaf.ServiceURI },
    roots: { activeRootId: f.roots.ActiveRootID, ids: f.roots.Roots.map((root) => root.ID) },
    intentions: { count: 1, index: 10, defaultAllow: false, protocol: 'tcp', requestNormalization: { MergeSlashes: true } },
    watches: undefined,
    registration: null,
    enforcement: { mode: 'enforce', routes: {} },
    candidate: null
  })
  t.same(Object.keys(status.watches), ['leaf', 'roots', 'intentions', 'service-defaults', 'proxy-defaults', 'mesh', 'jwt-providers'])
  for (const [name, watch] of Object.entries(status.watches)) {
    t.match(watch, { lastSuccess: /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/, lastError: null, failures: 0 }, name)
  }
  t.same([...new Set(h.agent.requests)].sort(),
    ['intentions api', 'leaf api', 'mesh mesh', 'proxy-defaults global', 'roots', 'service-defaults api'], 'what the watches ask for')

  // After start-up, a mesh change emits 'intentions' (it changes decisions); a deleted entry clears it.
  let changed = once(h.sync.events, 'intentions')
  h.agent.entries.mesh.set(meshEntry({ PathWithEscapedSlashesAction: 'REJECT_REQUEST' }), 5)
  let [next] = await changed as [ConsulNativeStatus]
  t.same(next.intentions?.requestNormalization, { PathWithEscapedSlashesAction: 'REJECT_REQUEST' })
  t.same(h.sync.normalization, { PathWithEscapedSlashesAction: 'REJECT_REQUEST' })
  changed = once(h.sync.events, 'intentions')
  h.agent.entries.mesh.set(null, 6)
  ;[next] = await changed as [ConsulNativeStatus]
  t.equal(next.intentions?.requestNormalization, null)
  t.equal(h.sync.normalization, null)

  // A failing watch shows in its entry, with the last success kept.
  const failed = once(h.sync.events, 'sync-error')
  h.agent.roots.fail(new Error('roots unavailable'))
  await failed
  t.match(h.sync.status().watches.roots, { lastSuccess: /Z$/, lastError: 'roots unavailable', failures: Number })
  t.ok((h.sync.status().watches.roots?.failures ?? 0) >= 1)
})

t.test('ready is true only within the leaf\'s validity period', async (t) => {
  const f = await fixtures()
  const h = harness(t)
  serve(h.agent, f)
  await h.sync.start()
  t.equal(h.sync.ready, true)
  const cases: Array<[string, Partial<IssuedCert>]> = [
    ['expired', { ValidAfter: '2000-01-01T00:00:00Z', ValidBefore: '2000-01-04T00:00:00Z' }],
    ['not yet valid', { ValidAfter: '2999-01-01T00:00:00Z', ValidBefore: '2999-01-04T00:00:00Z' }],
    ['valid', {}]
  ]
  let index = 2
  for (const [name, times] of cases) {
    const installed = once(h.sync.events, 'tls')
    h.agent.leaf.set({ ...f.leaf2, ...times }, index++)
    const [status] = await installed as [ConsulNativeStatus]
    t.equal(status.ready, name === 'valid', name)
    t.equal(h.sync.ready, name === 'valid', name)
  }
})

t.test('a higher index with the same value (a config entry written elsewhere) recompiles and announces nothing', async (t) => {
  const f = await fixtures()
  const h = harness(t)
  serve(h.agent, f, { intentions: [intention('web')], serviceDefaults: serviceDefaults('http') })
  await h.sync.start()
  const before = [h.emitted.tls.length, h.emitted.intentions.length]
  const policy = h.sync.policy
  for (const index of [20, 21, 22]) {
    const handled = h.agent.intentions.nextPoll()
    h.agent.intentions.set([intention('web')], index)
    t.equal((await handled).index, index, 'the watch moves to the new index')
  }
  const rootsHandled = h.agent.roots.nextPoll()
  h.agent.roots.set({ ...f.roots }, 30)
  await rootsHandled
  t.same([h.emitted.tls.length, h.emitted.intentions.length], before, 'no tls or intentions event')
  t.equal(h.sync.policy, policy, 'the compiled policy is the same object')
  const changed = once(h.sync.events, 'intentions')
  h.agent.intentions.set([intention('web', { Action: 'deny' })], 23)
  await changed
  t.equal(allows(h.sync.policy, 'web'), false, 'a real change still applies')
})

t.test('a value reissued under the same index (agent restarted without its state) is applied only if it differs', async (t) => {
  const f = await fixtures()
  const rotatedCa = await DevCertificateAuthority.create({ clusterId: f.ca.clusterId })
  const h = harness(t)
  serve(h.agent, f, { intentions: [intention('web')], serviceDefaults: serviceDefaults('http') })
  await h.sync.start()

  /** The agent drops the held poll and comes back answering `body` at the same index 1. */
  async function restart<T> (endpoint: FakeEndpoint<T>, body: T): Promise<void> {
    const failed = once(h.sync.events, 'sync-error')
    endpoint.fail(new Error('agent restarting'))
    await failed
    // The retry (a non-blocking read, after the backoff) gets `body`; the poll after it shows it was handled.
    const handled = endpoint.poll(endpoint.polls.length + 2)
    endpoint.set(body, 1)
    await holdingOpen(handled)
  }
  const counts = (): number[] => [h.emitted.tls.length, h.emitted.intentions.length]

  const before = counts()
  await restart(h.agent.leaf, { ...f.leaf })
  await restart(h.agent.roots, { ...f.roots, Roots: f.roots.Roots.map((root) => ({ ...root })) })
  await restart(h.agent.intentions, [intention('web')])
  await restart(h.agent.entries['service-defaults'], serviceDefaults('http'))
  t.same(counts(), before, 'identical values are not applied again')
  t.same(Object.values(h.sync.status().watches).map((watch) => watch.lastError), [null, null, null, null, null, null, null], 'every watch recovered')

  await restart(h.agent.leaf, f.leaf2)
  t.equal(h.tls.material?.certPem, f.leaf2.CertPEM, 'a different leaf (serial) is installed')
  await restart(h.agent.roots, caRoots(rotatedCa))
  t.same(h.tls.material?.rootPems, rotatedCa.roots().map((root) => root.RootCert), 'different roots (ids) are installed')
  await restart(h.agent.intentions, [intention('web', { Action: 'deny' })])
  t.equal(allows(h.sync.policy, 'web'), false, 'a different intention list is compiled')
  await restart(h.agent.entries['service-defaults'], serviceDefaults('grpc'))
  t.equal(h.sync.status().intentions?.protocol, 'grpc', 'a different config entry is applied')
  t.same(counts(), [before[0] as number + 2, before[1] as number + 2])
})

t.test('stop() ends every poll in flight and the expiry check; a second stop() does nothing', async (t) => {
  const f = await fixtures()
  const intervals = recordIntervals(t)
  const h = harness(t)
  serve(h.agent, f)
  await h.sync.start()
  await Promise.all(h.agent.endpoints.map(async (endpoint) => await endpoint.poll(2)))
  t.same(h.agent.endpoints.map((endpoint) => endpoint.held), [1, 1, 1, 1, 1, 1], 'every watch holds a blocking poll')
  const check = intervals.set.find((interval) => interval.ms === 60_000)

  h.sync.stop()
  t.same(h.agent.endpoints.map((endpoint) => [endpoint.held, endpoint.aborted]), Array(6).fill([0, 1]), 'every poll was aborted')
  t.equal(intervals.cleared.filter((timer) => timer === check?.timer).length, 1)

  h.sync.stop()
  t.same(h.agent.endpoints.map((endpoint) => endpoint.aborted), Array(6).fill(1), 'nothing aborted twice')
  t.equal(intervals.cleared.filter((timer) => timer === check?.timer).length, 1, 'the check is not cleared twice')
  t.equal(h.emitted.errors.length, 0, 'stopping is no sync error')
})

t.test('the reported intentions index is that of the intentions in force, not of a rejected update', async (t) => {
  const f = await fixtures()
  const h = harness(t)
  serve(h.agent, f, { intentions: [intention('web')], intentionsIndex: 10 })
  await h.sync.start()
  t.equal(h.sync.status().intentions?.index, 10)
  const rejected = once(h.sync.events, 'sync-error')
  h.agent.intentions.set([intention('web', { Action: undefined, Permissions: [{ Action: 'allow', HTTP: { PathRegex: '(' } }] })], 11)
  await rejected
  const recompiled = once(h.sync.events, 'intentions')
  h.agent.entries['service-defaults'].set({ kind: 'service-defaults', name: 'api', protocol: 'http' }, 12)
  await recompiled
  t.equal(h.sync.status().intentions?.protocol, 'http')
  t.equal(h.sync.status().intentions?.index, 10, 'still the index of the accepted intentions')
})

t.test('a throwing event listener is logged and the update stays in force', async (t) => {
  const f = await fixtures()
  const h = harness(t)
  serve(h.agent, f, { intentions: [intention('web')], intentionsIndex: 10 })
  h.sync.events.on('intentions', () => { throw new Error('listener bug') })
  const after: number[] = []
  h.sync.events.on('intentions', () => { after.push(1) })
  let once = 0
  h.sync.events.once('intentions', () => { once++ })
  await h.sync.start()
  t.equal(h.sync.status().intentions?.index, 10)
  t.match(h.logger.events('listener-failed')[0], { level: 'error', obj: { consulNative: { listenerEvent: 'intentions' } } })
  t.ok(after.length > 0, 'the listeners after it still ran')
  t.equal(once, 1, 'a once() listener ran once')
  t.equal(h.sync.events.listenerCount('intentions'), 3, 'and was removed (the harness\'s own and the two above stay)')
  t.same(h.emitted.errors, [], 'not reported as a rejected update')
})

t.test('jwt-provider entries: an agent before Consul 1.16, which does not know the kind, has none (docs/semantics.md#jwt-providers)', async (t) => {
  const f = await fixtures()
  const h = harness(t)
  h.agent.jwtProviders.set(null, 1)
  serve(h.agent, f)
  await h.sync.start()
  t.equal(h.sync.ready, true)
  // The watch asks again only after a blocking query's wait; stop() ends that wait at once.
  await h.agent.jwtProviders.poll(2)
  // The held blocking read answers (still without the kind): the watch then waits before asking again.
  h.agent.jwtProviders.set(null, 2)
  await new Promise((resolve) => setImmediate(resolve))
  h.sync.stop()
  t.same(h.sync.status().watches['jwt-providers'], { lastSuccess: h.sync.status().watches['jwt-providers']?.lastSuccess, lastError: null, failures: 0 })
})
