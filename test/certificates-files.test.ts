// certificates: { source: 'files' } (docs/semantics.md#certificate-files): the layouts it reads, rotation by
// rename and by Kubernetes' symlink swap under load, and every way a bad file keeps the last good
// material. Each change is awaited through the plugin's events, never by sleeping.
import t from 'tap'
import { once } from 'node:events'
import { createPrivateKey, X509Certificate } from 'node:crypto'
import { mkdir, mkdtemp, rename, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import Fastify from 'fastify'
import type { FastifyInstance } from 'fastify'
import consulNative, { httpsOptions } from '../lib/index'
import type { ConsulNativeOptions } from '../lib/index'
import { FileCertificateSource, SPIFFE_CREDENTIAL_BUNDLES } from '../lib/certificates/files'
import type { CertificateSink, LeafCertificate, SourcePart, TrustBundle } from '../lib/certificates/source'
import { resolveOptions } from '../lib/options'
import type { DevAgent } from '../lib/dev-agent/index'
import { defaultRoutes, get, leafFor, mtlsClient, startAgent, waitForStatus } from './helpers/mesh'
import type { Tap } from './helpers/mesh'
import { servedLeaf, startLoad } from './helpers/load'
import { recordingLogger } from './helpers/stub-agent'

interface Issued { certPem: string, keyPem: string, serial: string }

async function issue (agent: DevAgent, service = 'api'): Promise<Issued> {
  const leaf = await agent.ca.signLeaf(service)
  return { certPem: leaf.certPem, keyPem: leaf.privateKeyPem, serial: leaf.serialNumber }
}

function rootsPem (agent: DevAgent): string {
  return agent.ca.roots().map((root) => root.RootCert).join('')
}

async function tempDir (t: Tap): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'consul-native-files-'))
  t.teardown(async () => await rm(dir, { recursive: true, force: true }))
  return dir
}

/** Writes a file the way rotating tools do: a temporary name, then an atomic rename. */
async function replace (path: string, content: string): Promise<void> {
  await writeFile(`${path}.tmp`, content)
  await rename(`${path}.tmp`, path)
}

async function startFilesService (t: Tap, agent: DevAgent, certificates: ConsulNativeOptions['certificates'], extra: Partial<ConsulNativeOptions> = {}): Promise<{ app: FastifyInstance, port: number, origin: string }> {
  const app = Fastify({ https: httpsOptions() }) as unknown as FastifyInstance
  t.teardown(async () => await app.close())
  await app.register(consulNative, { service: 'api', agent: { address: agent.address }, certificates, ...extra })
  defaultRoutes(app)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port
  return { app, port, origin: `https://127.0.0.1:${port}` }
}

/** Resolves with the next TLS status whose leaf serial is `serial`. */
async function leafInstalled (app: FastifyInstance, serial: string): Promise<void> {
  await waitForStatus(app, (status) => status.leaf?.serial === serial)
}

t.test('explicit files (Vault Agent, consul-template): served, then rotated by rename under load with no failed request', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const dir = await tempDir(t)
  const first = await issue(agent)
  const files = { certFile: join(dir, 'svc.pem'), keyFile: join(dir, 'svc-key.pem'), caFile: join(dir, 'ca.pem') }
  await writeFile(files.certFile, first.certPem)
  await writeFile(files.keyFile, first.keyPem)
  await writeFile(files.caFile, rootsPem(agent))
  const svc = await startFilesService(t, agent, { source: 'files', ...files })

  const status = svc.app.consulNative.status()
  t.equal(status.leaf?.serial, first.serial, 'the leaf from the files is in force')
  t.equal(status.trustDomain, agent.trustDomain, 'trust domain read from the leaf\'s SPIFFE ID')
  t.equal(status.roots?.ids.length, 1)
  t.same(Object.keys(status.watches).slice(0, 2), ['leaf', 'roots'])
  const creds = await leafFor(agent, 'web')
  t.equal((await get(mtlsClient(t, creds), `${svc.origin}/`)).body.hello, 'web', 'an mTLS caller is identified')

  const load = startLoad(t, svc.origin, creds)
  await load.more(20)
  const second = await issue(agent)
  const installed = leafInstalled(svc.app, second.serial)
  // Key first, then certificate: in between the pair does not match and must not be used.
  await replace(files.keyFile, second.keyPem)
  await replace(files.certFile, second.certPem)
  await installed
  t.equal((await servedLeaf(svc.port, creds)).serialNumber.toLowerCase(), second.serial.replace(/:/g, ''), 'new connections get the new leaf')
  await load.more(20)
  const result = await load.stop()
  t.equal(result.failures, 0, `no failed request out of ${result.requests} (${result.errors.slice(0, 3).join('; ')})`)
})

t.test('a SPIFFE credential folder from SPIFFE_CREDENTIAL_FOLDER, and every credential bundle name', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const creds = await leafFor(agent, 'web')
  for (const [i, name] of SPIFFE_CREDENTIAL_BUNDLES.entries()) {
    const dir = await tempDir(t)
    const leaf = await issue(agent)
    const pkcs8 = createPrivateKey(leaf.keyPem).export({ type: 'pkcs8', format: 'pem' }) as string
    await writeFile(join(dir, name), pkcs8 + leaf.certPem)
    const suffix = ['.trust-bundle.pem', '.spiffe-trust-bundle.pem', '.spiffe-trust-bundle.x509.pem'][i] as string
    await writeFile(join(dir, `${agent.trustDomain}${suffix}`), rootsPem(agent))
    // Another trust domain's bundle (federation) is not this service's trust.
    await writeFile(join(dir, `other.example${suffix}`), 'not read')
    const previous = process.env.SPIFFE_CREDENTIAL_FOLDER
    process.env.SPIFFE_CREDENTIAL_FOLDER = dir
    try {
      const svc = await startFilesService(t, agent, { source: 'files' })
      t.equal(svc.app.consulNative.status().leaf?.serial, leaf.serial, name)
      t.equal((await get(mtlsClient(t, creds), `${svc.origin}/`)).status, 200)
      await svc.app.close()
    } finally {
      if (previous === undefined) delete process.env.SPIFFE_CREDENTIAL_FOLDER
      else process.env.SPIFFE_CREDENTIAL_FOLDER = previous
    }
  }
})

t.test('csi-driver-spiffe: a Kubernetes ..data symlink swap under load with no failed request', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const dir = await tempDir(t)
  // The kubelet's atomic writer: a timestamped folder, `..data` pointing at it, and one symlink per file.
  const writeVersion = async (name: string, leaf: Issued): Promise<void> => {
    await mkdir(join(dir, name))
    await writeFile(join(dir, name, 'tls.crt'), leaf.certPem)
    await writeFile(join(dir, name, 'tls.key'), leaf.keyPem)
    await writeFile(join(dir, name, 'ca.crt'), rootsPem(agent))
    await symlink(name, join(dir, '..data_tmp'))
    await rename(join(dir, '..data_tmp'), join(dir, '..data'))
  }
  const first = await issue(agent)
  await writeVersion('..2026_12_06_10_00_00.1', first)
  for (const file of ['tls.crt', 'tls.key', 'ca.crt']) await symlink(join('..data', file), join(dir, file))
  const svc = await startFilesService(t, agent, { source: 'files', dir })
  t.equal(svc.app.consulNative.status().leaf?.serial, first.serial)

  const creds = await leafFor(agent, 'web')
  const load = startLoad(t, svc.origin, creds)
  await load.more(20)
  const second = await issue(agent)
  const installed = leafInstalled(svc.app, second.serial)
  await writeVersion('..2026_12_06_11_00_00.2', second)
  await installed
  t.equal((await servedLeaf(svc.port, creds)).serialNumber.toLowerCase(), second.serial.replace(/:/g, ''))
  await load.more(20)
  const result = await load.stop()
  t.equal(result.failures, 0, `no failed request out of ${result.requests} (${result.errors.slice(0, 3).join('; ')})`)
})

t.test('a half-written or mismatched file keeps the last good material and says why', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const dir = await tempDir(t)
  const first = await issue(agent)
  const files = { certFile: join(dir, 'cert.pem'), keyFile: join(dir, 'key.pem'), caFile: join(dir, 'ca.pem') }
  await writeFile(files.certFile, first.certPem)
  await writeFile(files.keyFile, first.keyPem)
  await writeFile(files.caFile, rootsPem(agent))
  const svc = await startFilesService(t, agent, { source: 'files', ...files, pollInterval: 50 })
  const creds = await leafFor(agent, 'web')
  const events = svc.app.consulNative.events

  const cases: Array<{ name: string, part: string, reason: RegExp, write: () => Promise<void> }> = [
    { name: 'a truncated certificate', part: 'leaf', reason: /leaf certificate: no CERTIFICATE block/, write: async () => await replace(files.certFile, first.certPem.slice(0, 40)) },
    { name: 'a key of another certificate', part: 'leaf', reason: /does not belong to the leaf/, write: async () => await replace(files.keyFile, (await issue(agent)).keyPem) },
    { name: 'an unreadable key', part: 'leaf', reason: /private key unreadable/, write: async () => await replace(files.keyFile, '-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n') },
    { name: 'an empty CA bundle', part: 'roots', reason: /CA bundle: no CERTIFICATE block/, write: async () => await replace(files.caFile, '') },
    { name: 'a missing file', part: 'leaf', reason: /cannot read .*cert\.pem/, write: async () => await rm(files.certFile) }
  ]
  for (const c of cases) {
    const failed = once(events, 'sync-error')
    await c.write()
    const [{ watch, error }] = await failed as [{ watch: string, error: Error }]
    t.equal(watch, c.part, `${c.name}: reported on ${c.part}`)
    t.match(error.message, c.reason, c.name)
    t.match(svc.app.consulNative.status().watches[c.part]?.lastError, c.reason, 'status names the problem')
    t.equal(svc.app.consulNative.status().leaf?.serial, first.serial, 'the last good leaf stays')
    t.equal((await get(mtlsClient(t, creds), `${svc.origin}/`)).status, 200, 'and serves')
    // Back to the good files.
    const restored = once(events, 'tls')
    await replace(files.certFile, first.certPem)
    await replace(files.keyFile, first.keyPem)
    await replace(files.caFile, rootsPem(agent))
    await restored
    t.equal(svc.app.consulNative.status().watches.leaf?.lastError, null, 'healthy again')
  }
  const warned = svc.app.consulNative.status().watches
  t.equal(warned.roots?.failures, 0)
})

t.test('FileCertificateSource on its own: trust domain rules, chains, repeats and rejections', async (t) => {
  const agent = await startAgent(t)
  const other = await startAgent(t)
  const dir = await tempDir(t)
  const files = { certFile: join(dir, 'cert.pem'), keyFile: join(dir, 'key.pem'), caFile: join(dir, 'ca.pem') }
  const leaf = await issue(agent)
  await writeFile(files.certFile, leaf.certPem)
  await writeFile(files.keyFile, leaf.keyPem)
  await writeFile(files.caFile, rootsPem(other))

  const run = async (opts: Record<string, unknown>, reject = false): Promise<{ updates: Array<{ leaf?: LeafCertificate, trust?: TrustBundle }>, failures: Array<{ part: SourcePart, error: Error }>, source: FileCertificateSource, logger: ReturnType<typeof recordingLogger> }> => {
    const logger = recordingLogger()
    const source = new FileCertificateSource(resolveOptions({ service: 'api', certificates: { source: 'files', ...opts } }).certificates as never, {}, logger.log)
    const updates: Array<{ leaf?: LeafCertificate, trust?: TrustBundle }> = []
    const failures: Array<{ part: SourcePart, error: Error }> = []
    const sink: CertificateSink = {
      update: (change) => {
        if (reject) throw new Error('key values mismatch')
        updates.push(change)
      },
      failure: (part, error) => failures.push({ part, error })
    }
    source.start(sink)
    t.teardown(() => source.stop())
    return { updates, failures, source, logger }
  }

  const unchained = await run({ ...files, pollInterval: 10 })
  t.match(unchained.failures[0]?.error.message, /does not chain to the CA bundle/, 'a leaf of another CA is refused')
  // A file that stays missing: read on every poll, reported once.
  await rm(files.caFile)
  while (unchained.logger.events('certificate-files-rejected-again').length === 0) await new Promise((resolve) => setImmediate(resolve))
  t.equal(unchained.failures.filter((f) => /cannot read/.test(f.error.message)).length, 1, 'one report for one cause')
  t.equal(unchained.source.health().roots.failures, 2, 'the missing bundle is the current problem')
  t.equal(unchained.source.health().leaf.failures, 0, 'the leaf is not the problem now')
  t.equal(unchained.source.health().leaf.lastError, null)

  await writeFile(files.caFile, rootsPem(agent))
  const wrongDomain = await run({ ...files, trustDomain: 'elsewhere.consul' })
  t.match(wrongDomain.failures[0]?.error.message, /is not in trust domain elsewhere\.consul/)

  const rejected = await run(files, true)
  t.match(rejected.failures[0]?.error.message, /rejected by TLS: key values mismatch/)
  t.equal(rejected.logger.events('certificate-files-rejected').length, 1, 'logged once')

  // The same failure read again (a poll finding the same missing file) is reported and logged once;
  // a restart reads at once, so this does not wait for a poll.
  const missing = await run({ ...files, certFile: join(dir, 'absent.pem') })
  missing.source.stop()
  missing.source.start({ update: () => undefined, failure: (part, error) => missing.failures.push({ part, error }) })
  t.equal(missing.failures.length, 1, 'a repeated failure is not reported again')
  t.equal(missing.logger.events('certificate-files-rejected').length, 1, 'nor logged again')

  const good = await run({ ...files, trustDomain: agent.trustDomain.toUpperCase() })
  t.equal(good.updates.length, 1)
  t.equal(good.updates[0]?.trust?.trustDomain, agent.trustDomain)
  t.equal(good.updates[0]?.leaf?.uri, `spiffe://${agent.trustDomain}/ns/default/dc/dc1/svc/api`)
  t.equal(good.updates[0]?.trust?.activeRootId, new X509Certificate(agent.ca.roots()[0]?.RootCert as string).fingerprint.toLowerCase())
  t.ok(good.source.health().leaf.lastSuccess instanceof Date)

  // A SPIFFE folder read again with the same bundle: the trust domain comes from the previous read.
  const spiffe = join(dir, 'spiffe')
  await mkdir(spiffe)
  await writeFile(join(spiffe, 'credential-bundle.pem'), leaf.keyPem + leaf.certPem.trimEnd())
  await writeFile(join(spiffe, `${agent.trustDomain}.trust-bundle.pem`), rootsPem(agent))
  const folder = await run({ dir: spiffe, pollInterval: 10 })
  t.equal(folder.updates.length, 1, 'a chain without a final newline reads the same')
  const firstRead = folder.source.health().leaf.lastSuccess
  while (folder.source.health().leaf.lastSuccess === firstRead) await new Promise((resolve) => setImmediate(resolve))
  t.equal(folder.updates.length, 1, 'an unchanged folder is not delivered again')
  t.equal(folder.failures.length, 0)
  const named = await run({ dir: spiffe, trustDomain: agent.trustDomain })
  t.equal(named.updates.length, 1, 'trustDomain names the trust bundle')

  // A CA bundle without a self-signed root (an intermediate only, as Vault's issuing_ca): refused
  // at once, since TLS would refuse every caller with it.
  const intermediate = await agent.ca.issueCertificate({ ca: true, commonName: 'intermediate' })
  await writeFile(files.caFile, intermediate.certPem)
  const partial = await run(files)
  t.match(partial.failures[0], { part: 'roots', error: { message: /no self-signed root certificate/ } })
  await writeFile(files.caFile, rootsPem(agent))

  // A leaf whose NotBefore is still ahead: refused, then installed from the same bytes once valid.
  const uri = `spiffe://${agent.trustDomain}/ns/default/dc/dc1/svc/api`
  const early = await agent.ca.issueCertificate({ uris: [uri], notBefore: new Date(Math.ceil((Date.now() + 1500) / 1000) * 1000) })
  await writeFile(files.certFile, early.certPem)
  await writeFile(files.keyFile, early.privateKeyPem)
  const waiting = await run({ ...files, pollInterval: 50 })
  t.match(waiting.failures[0]?.error.message, /is not valid now/)
  while (waiting.updates.length === 0) await new Promise((resolve) => setTimeout(resolve, 50))
  t.equal(waiting.updates[0]?.leaf?.uri, uri, 'installed once valid, the files unchanged')
  t.equal(waiting.logger.events('certificate-files-rejected').length, 1, 'the wait is logged once')

  const noUri = await agent.ca.issueCertificate({ dnsNames: ['api.example'] })
  await writeFile(files.certFile, noUri.certPem)
  await writeFile(files.keyFile, noUri.privateKeyPem)
  const anonymous = await run(files)
  t.match(anonymous.failures[0]?.error.message, /no spiffe:\/\/ URI SAN/)
})

t.test('a folder with no known layout, or none at all, fails register() with NOT_READY and the reason', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const empty = await tempDir(t)
  for (const [dir, reason] of [[empty, /holds neither tls\.crt/], [join(empty, 'missing'), /cannot list/]] as const) {
    const app = Fastify({ https: httpsOptions() })
    t.teardown(async () => await app.close())
    await t.rejects((async () => { await app.register(consulNative, { service: 'api', agent: { address: agent.address }, readyTimeout: 300, certificates: { source: 'files', dir } } as never) })(),
      { code: 'FST_CONSUL_NATIVE_NOT_READY', message: reason })
  }
  const dir = await tempDir(t)
  const leaf = await issue(agent)
  await writeFile(join(dir, 'credential-bundle.pem'), leaf.keyPem + leaf.certPem)
  const app = Fastify({ https: httpsOptions() })
  t.teardown(async () => await app.close())
  await t.rejects((async () => { await app.register(consulNative, { service: 'api', agent: { address: agent.address }, readyTimeout: 300, certificates: { source: 'files', dir } } as never) })(),
    { code: 'FST_CONSUL_NATIVE_NOT_READY', message: /roots: .*no trust bundle for/ }, 'a credential bundle without its trust bundle')
  await writeFile(join(dir, 'credential-bundle.pem'), leaf.certPem)
  const noKey = Fastify({ https: httpsOptions() })
  t.teardown(async () => await noKey.close())
  await t.rejects((async () => { await noKey.register(consulNative, { service: 'api', agent: { address: agent.address }, readyTimeout: 300, certificates: { source: 'files', dir } } as never) })(),
    { code: 'FST_CONSUL_NATIVE_NOT_READY', message: /credential-bundle\.pem: private key unreadable/ }, 'a credential bundle without a key')
})

t.test('a folder created after start is picked up by polling', async (t) => {
  const agent = await startAgent(t, { defaultPolicy: 'allow' })
  const parent = await tempDir(t)
  const dir = join(parent, 'later')
  const app = Fastify({ https: httpsOptions() })
  t.teardown(async () => await app.close())
  const registered = app.register(consulNative, { service: 'api', agent: { address: agent.address }, certificates: { source: 'files', dir, pollInterval: 20 } }).ready()
  const leaf = await issue(agent)
  await mkdir(dir)
  await writeFile(join(dir, 'tls.key'), leaf.keyPem)
  await writeFile(join(dir, 'ca.crt'), rootsPem(agent))
  await writeFile(join(dir, 'tls.crt'), leaf.certPem)
  await registered
  t.equal(app.consulNative.status().leaf?.serial, leaf.serial)
})

t.test('certificates option validation', async (t) => {
  const bad: Array<[unknown, RegExp]> = [
    [null, /certificates: must be an object/],
    [{ source: 'vault' }, /certificates\.source: must be one of/],
    [{ source: 'files', ca: 'x' }, /certificates\.ca: is not an option of source 'files'/],
    [{ source: 'agent', dir: '/x' }, /certificates\.dir: is not an option of source 'agent'/],
    [{ source: 'files', certFile: '/a' }, /give certFile, keyFile and caFile together/],
    [{ source: 'files', certFile: '/a', keyFile: '/b', caFile: '/c', dir: '/d' }, /either dir or certFile/],
    [{ source: 'files', dir: '' }, /certificates\.dir: must be a non-empty string/],
    [{ source: 'files', trustDomain: 'a/b' }, /certificates\.trustDomain/],
    [{ source: 'files', pollInterval: 1 }, /certificates\.pollInterval/],
    [{ source: 'files', pollInterval: 'x' }, /certificates\.pollInterval/]
  ]
  for (const [certificates, message] of bad) {
    t.throws(() => resolveOptions({ service: 'api', certificates }), { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message }, JSON.stringify(certificates))
  }
  t.same(resolveOptions({ service: 'api', certificates: {} }).certificates, { source: 'agent' }, 'source defaults to agent')
  t.same(resolveOptions({ service: 'api', certificates: { source: 'files', dir: '/d', pollInterval: 250.5 } }).certificates, { source: 'files', dir: '/d', pollInterval: 250 })
  const previous = process.env.SPIFFE_CREDENTIAL_FOLDER
  process.env.SPIFFE_CREDENTIAL_FOLDER = ''
  t.teardown(() => {
    if (previous === undefined) delete process.env.SPIFFE_CREDENTIAL_FOLDER
    else process.env.SPIFFE_CREDENTIAL_FOLDER = previous
  })
  const app = Fastify({ https: httpsOptions() })
  t.teardown(async () => await app.close())
  await t.rejects((async () => { await app.register(consulNative, { service: 'api', certificates: { source: 'files' } } as never) })(),
    { code: 'FST_CONSUL_NATIVE_INVALID_OPTION', message: /SPIFFE_CREDENTIAL_FOLDER/ })
})
