// `certificates: { source: 'consul-grpc' }` (docs/semantics.md#consul-grpc): agentless, as
// consul-dataplane runs. A WatchRoots stream to a Consul server keeps the roots current; the
// leaf is this process's own P-256 key, certified by Sign for the service's SPIFFE ID, and
// renewed at a jittered point of its lifetime and at once when the active root changes.
import { generateKeyPair, X509Certificate } from 'node:crypto'
import type { KeyObject } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { promisify } from 'node:util'
import * as grpc from '@grpc/grpc-js'
import { CertificateSourceError, InvalidOptionError } from '../errors'
import { serviceSpiffeId } from '../spiffe'
import { connectCA } from './connectca'
import type { CARootMessage, ConnectCAClient, ConnectCAClientConstructor, WatchRootsResponse } from './connectca'
import { createCsr } from './csr'
import type { ConsulGrpcCertificatesOptions } from './options'
import { leafFromPem } from './source'
import type { CertificateSink, CertificateSource, LeafCertificate, SourceHealth, SourceLogger, SourcePart, TrustBundle } from './source'
import { logEvent } from '../log'

const generateKeyPairAsync = promisify(generateKeyPair)

/** Where and how to reach the server's gRPC port. */
export interface GrpcTarget {
  /** `host:port`. */
  address: string
  plaintext: boolean
  ca: Buffer | null
  servername: string | undefined
}

export interface GrpcSourceContext {
  service: string
  namespace: string | undefined
  partition: string | undefined
  /** The ACL token of the agent options, sent as `x-consul-token`. */
  token: string | null
  /** The datacenter of the SPIFFE ID: configured, or read from the HTTP API. */
  datacenter: () => Promise<string>
  /** Source of jitter in [0, 1); tests pin it. */
  random?: () => number
}

const SIGN_TIMEOUT_MS = 30_000
/** Renewals never follow each other closer than this, so a very short-lived leaf cannot spin. */
const MIN_RENEWAL_MS = 1000
const BACKOFF = { initialMs: 200, maxMs: 30_000 }
/** setTimeout's longest delay; longer waits (a leaf of months) are chained. */
const MAX_TIMER_MS = 2 ** 31 - 1
// Below Consul's server keepalive enforcement (15 s minimum), and enough to notice a dead server.
const CHANNEL_OPTIONS = { 'grpc.keepalive_time_ms': 30_000, 'grpc.keepalive_timeout_ms': 10_000 }

/** Reads the target from the options and CONSUL_GRPC_ADDR / CONSUL_GRPC_CACERT; throws InvalidOptionError. */
export function resolveGrpcTarget (opts: ConsulGrpcCertificatesOptions, env: NodeJS.ProcessEnv): GrpcTarget {
  const raw = opts.address ?? nonEmpty(env.CONSUL_GRPC_ADDR)
  const subject = opts.address !== undefined ? 'certificates.address' : 'CONSUL_GRPC_ADDR'
  if (raw === undefined) {
    throw new InvalidOptionError('certificates.address', "source 'consul-grpc' needs a Consul server's gRPC address: set certificates.address or CONSUL_GRPC_ADDR (host:port)")
  }
  const match = /^(?:(https?):\/\/)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})\/?$/.exec(raw.trim())
  if (match === null || Number(match[3]) > 65535) {
    throw new InvalidOptionError('certificates.address', `${subject} must be host:port, https://host:port or http://host:port (plaintext), got "${raw}"`)
  }
  const scheme = match[1]
  if (scheme === 'https' && opts.plaintext === true) {
    throw new InvalidOptionError('certificates.plaintext', `contradicts ${subject} "${raw}" (https://)`)
  }
  const plaintext = scheme === 'http' || opts.plaintext === true
  const address = `${match[2] as string}:${match[3] as string}`
  if (plaintext) {
    for (const name of ['ca', 'caFile', 'tlsServerName'] as const) {
      if (opts[name] !== undefined) throw new InvalidOptionError(`certificates.${name}`, `only applies to TLS, but the gRPC address ${raw} is plaintext`)
    }
    return { address, plaintext, ca: null, servername: undefined }
  }
  let ca: Buffer | null = opts.ca === undefined ? null : Buffer.from(opts.ca)
  const file = opts.caFile ?? (opts.ca === undefined ? nonEmpty(env.CONSUL_GRPC_CACERT) : undefined)
  if (file !== undefined) {
    const from = opts.caFile !== undefined ? 'certificates.caFile' : 'CONSUL_GRPC_CACERT'
    try {
      ca = readFileSync(file)
    } catch (err) {
      throw new InvalidOptionError('certificates.caFile', `cannot read ${from} ("${file}"): ${(err as Error).message}`, { cause: err })
    }
  }
  return { address, plaintext, ca, servername: opts.tlsServerName }
}

/**
 * When to renew a leaf, as Consul's agent cache does: at a random point between 60% and 90% of
 * its lifetime; at once past 90%; when already past 60%, between now and 90%. Returns the delay
 * in ms from `now`; the caller spaces renewals by at least MIN_RENEWAL_MS.
 */
export function renewalDelay (validAfter: number, validBefore: number, now: number, random: number): number {
  const lifetime = validBefore - validAfter
  const hard = validAfter + lifetime * 0.9
  if (now >= hard) return 0
  const soft = Math.max(validAfter + lifetime * 0.6, now)
  return Math.floor(soft + (hard - soft) * random - now)
}

class Health {
  lastSuccess: Date | null = null
  lastError: Error | null = null
  failures = 0
  ok (): void {
    this.lastSuccess = new Date()
    this.lastError = null
    this.failures = 0
  }

  failed (err: Error): void {
    this.lastError = err
    this.failures++
  }

  get snapshot (): SourceHealth {
    return { lastSuccess: this.lastSuccess, lastError: this.lastError, failures: this.failures }
  }
}

export class GrpcCertificateSource implements CertificateSource {
  readonly renewer = 'the Consul servers (Sign)'
  readonly #target: GrpcTarget
  readonly #ctx: GrpcSourceContext
  readonly #log: SourceLogger
  readonly #random: () => number
  readonly #client: ConnectCAClient
  readonly #roots = new Health()
  readonly #leaf = new Health()
  #sink: CertificateSink | null = null
  #stopped = false
  #call: grpc.ClientReadableStream<WatchRootsResponse> | null = null
  #trust: TrustBundle | null = null
  /** The active root's `signing_key_id` in the last roots message. */
  #signingKeyId = ''
  #current: LeafCertificate | null = null
  #datacenter: string | null = null
  #signing = false
  #signAgain = false
  #rootsTimer: NodeJS.Timeout | null = null
  #leafTimer: NodeJS.Timeout | null = null
  /** The cause last logged per part; a repeat goes to debug. */
  readonly #logged: Record<SourcePart, string | null> = { leaf: null, roots: null }

  constructor (target: GrpcTarget, ctx: GrpcSourceContext, log: SourceLogger) {
    this.#target = target
    this.#ctx = ctx
    this.#log = log
    this.#random = ctx.random ?? Math.random
    const credentials = target.plaintext ? grpc.credentials.createInsecure() : grpc.credentials.createSsl(target.ca)
    const options: grpc.ChannelOptions = { ...CHANNEL_OPTIONS }
    if (target.servername !== undefined) {
      options['grpc.ssl_target_name_override'] = target.servername
      options['grpc.default_authority'] = target.servername
    }
    const Client = connectCA() as unknown as ConnectCAClientConstructor
    this.#client = new Client(target.address, credentials, options)
  }

  start (sink: CertificateSink): void {
    this.#sink = sink
    this.#watch()
  }

  stop (): void {
    this.#stopped = true
    this.#call?.cancel()
    clearTimeout(this.#rootsTimer ?? undefined)
    clearTimeout(this.#leafTimer ?? undefined)
    this.#client.close()
  }

  health (): Record<SourcePart, SourceHealth> {
    return { leaf: this.#leaf.snapshot, roots: this.#roots.snapshot }
  }

  #metadata (): grpc.Metadata {
    const metadata = new grpc.Metadata()
    if (this.#ctx.token !== null) metadata.set('x-consul-token', this.#ctx.token)
    return metadata
  }

  // -------------------------------------------------------------------------------------------
  // Roots: one stream, reopened after any end with backoff.

  #watch (): void {
    const call = this.#client.WatchRoots({}, this.#metadata())
    this.#call = call
    let ended = false
    const end = (err: Error): void => {
      if (ended) return
      ended = true
      this.#call = null
      if (this.#stopped) return
      this.#failed('roots', err)
      this.#rootsTimer = setTimeout(() => this.#watch(), backoff(this.#roots.failures, this.#random)).unref()
    }
    call.on('data', (message: WatchRootsResponse) => this.#onRoots(message))
    call.on('error', (err: grpc.ServiceError) => end(rpcError('WatchRoots', err)))
    call.on('end', () => end(new CertificateSourceError('consul-grpc WatchRoots', 'the server ended the stream; reconnecting')))
  }

  #onRoots (message: WatchRootsResponse): void {
    let trust: TrustBundle
    try {
      trust = trustOf(message)
      // Healthy before the plugin's `tls` event fires; a rejection below marks it failed again.
      this.#roots.ok()
      ;(this.#sink as CertificateSink).update({ trust })
    } catch (err) {
      this.#failed('roots', err instanceof CertificateSourceError ? err : new CertificateSourceError('consul-grpc WatchRoots', (err as Error).message, { cause: err }))
      return
    }
    const previous = this.#trust
    const previousSigningKey = this.#signingKeyId
    this.#trust = trust
    // Consul's agents renew when the active root's signing key changes too: a secondary
    // datacenter renews its intermediate under the same root (leafcert, activeRootHasKey).
    this.#signingKeyId = (message.roots.find((root) => root.id === message.activeRootId) as CARootMessage).signingKeyId // trustOf checked it is there
    this.#recovered('roots')
    // docs/semantics.md#grpc-leaf-renewal: a new active root, signing key or trust domain signs a new leaf at once.
    if (previous === null || previous.activeRootId !== trust.activeRootId || previous.trustDomain !== trust.trustDomain ||
      previousSigningKey !== this.#signingKeyId) this.#renewNow()
  }

  // -------------------------------------------------------------------------------------------
  // Leaf: Sign with a fresh key; one signing at a time.

  #renewNow (): void {
    clearTimeout(this.#leafTimer ?? undefined)
    if (this.#signing) {
      this.#signAgain = true
      return
    }
    this.#signing = true
    this.#sign().finally(() => {
      this.#signing = false
      if (this.#signAgain && !this.#stopped) {
        this.#signAgain = false
        this.#renewNow()
      }
    }).catch(/* c8 ignore next -- #sign catches everything; a rejection here would be a bug, kept visible */ (err: Error) => { logEvent(this.#log, 'error', 'certificate-source-failed', { source: 'consul-grpc', part: 'leaf' }, 'leaf renewal failed unexpectedly', err) })
  }

  async #sign (): Promise<void> {
    const trust = this.#trust as TrustBundle
    const signed = await this.#newLeaf(trust).catch((err: Error) => err)
    if (this.#stopped) {
      logEvent(this.#log, 'debug', 'certificate-source-stopped', { source: 'consul-grpc' }, 'Sign answered after stop; discarded')
      return
    }
    let leaf: LeafCertificate
    try {
      if (signed instanceof Error) throw signed
      leaf = signed
      this.#leaf.ok()
      ;(this.#sink as CertificateSink).update({ leaf })
    } catch (err) {
      // Sign's own failures are typed already; the datacenter lookup's or a TLS rejection are wrapped.
      this.#failed('leaf', err instanceof CertificateSourceError ? err : new CertificateSourceError('consul-grpc leaf', (err as Error).message, { cause: err }))
      this.#schedule(backoff(this.#leaf.failures, this.#random))
      return
    }
    this.#current = leaf
    this.#recovered('leaf')
    this.#schedule(Math.max(MIN_RENEWAL_MS, renewalDelay(Date.parse(leaf.validAfter), Date.parse(leaf.validBefore), Date.now(), this.#random())))
  }

  /** A new key, its CSR for the service's SPIFFE ID, and the leaf Sign makes of it. */
  async #newLeaf (trust: TrustBundle): Promise<LeafCertificate> {
    this.#datacenter ??= await this.#ctx.datacenter()
    const uri = serviceSpiffeId(trust.trustDomain, {
      partition: this.#ctx.partition,
      namespace: this.#ctx.namespace,
      datacenter: this.#datacenter,
      service: this.#ctx.service
    })
    const { privateKey } = await generateKeyPairAsync('ec', { namedCurve: 'prime256v1' })
    const certPem = await this.#signCsr(createCsr(privateKey, [uri]))
    return leafOf(certPem, privateKey, uri)
  }

  async #signCsr (csr: string): Promise<string> {
    return await new Promise((resolve, reject) => {
      this.#client.Sign({ csr }, this.#metadata(), { deadline: Date.now() + SIGN_TIMEOUT_MS }, (err, response) => {
        if (err !== null) reject(rpcError('Sign', err))
        else resolve((response as { certPem: string }).certPem)
      })
    })
  }

  /** Renews after `delayMs`, chaining timers past setTimeout's limit. */
  #schedule (delayMs: number): void {
    clearTimeout(this.#leafTimer ?? undefined)
    const at = Date.now() + delayMs
    const arm = (): void => {
      this.#leafTimer = setTimeout(() => {
        /* c8 ignore next -- only when the renewal point is more than setTimeout's 24.8 days away */
        if (Date.now() < at) arm()
        else this.#renewNow()
      }, Math.min(Math.max(0, at - Date.now()), MAX_TIMER_MS)).unref()
    }
    arm()
  }

  // -------------------------------------------------------------------------------------------

  #failed (part: SourcePart, err: Error): void {
    const health = part === 'roots' ? this.#roots : this.#leaf
    health.failed(err)
    const fields = { source: 'consul-grpc', part, address: this.#target.address, failures: health.failures, serial: this.#current?.serial ?? null }
    const cause = failureCause(err.message)
    if (this.#logged[part] === cause) {
      logEvent(this.#log, 'debug', 'certificate-source-failed', fields, 'gRPC certificate source failed again', err)
    } else {
      this.#logged[part] = cause
      logEvent(this.#log, 'warn', 'certificate-source-failed', fields, `${err.message}; keeping the last good ${part === 'roots' ? 'roots' : 'leaf'}`, err)
    }
    ;(this.#sink as CertificateSink).failure(part, err)
  }

  #recovered (part: SourcePart): void {
    const health = part === 'roots' ? this.#roots : this.#leaf
    health.ok()
    if (this.#logged[part] !== null) {
      this.#logged[part] = null
      logEvent(this.#log, 'info', 'certificate-source-recovered', { source: 'consul-grpc', part }, 'gRPC certificate source recovered')
    }
  }
}

/**
 * A failure's message without what changes from one attempt to the next for the same cause:
 * grpc-js dates a connection the server dropped (`Failed to connect (2026-12-07T15:00:00.000Z)`)
 * and times a missed deadline (`Deadline exceeded after 10.002s,name resolution: 0.001s,...`).
 */
export function failureCause (message: string): string {
  return message.replace(/ ?\(\d{4}-\d\d-\d\dT[\d:.]+Z\)/g, '').replace(/Deadline exceeded after .*$/s, 'Deadline exceeded')
}

function trustOf (message: WatchRootsResponse): TrustBundle {
  if (message.trustDomain === '') throw new CertificateSourceError('consul-grpc WatchRoots', 'answer without a trust domain')
  if (message.roots.length === 0) throw new CertificateSourceError('consul-grpc WatchRoots', 'answer without roots')
  if (!message.roots.some((root) => root.id === message.activeRootId)) {
    throw new CertificateSourceError('consul-grpc WatchRoots', `active root "${message.activeRootId}" is not among the roots`)
  }
  // A root that is not a certificate would only fail later, inside the TLS context.
  const certificates = message.roots.map((root) => new X509Certificate(root.rootCert))
  if (certificates.some((cert) => !cert.ca)) throw new CertificateSourceError('consul-grpc WatchRoots', 'a root is not a CA certificate')
  return {
    trustDomain: message.trustDomain.toLowerCase(),
    rootPems: message.roots.map((root) => root.rootCert),
    intermediatePems: message.roots.flatMap((root) => root.intermediateCerts),
    activeRootId: message.activeRootId,
    rootIds: message.roots.map((root) => root.id)
  }
}

function leafOf (certPem: string, privateKey: KeyObject, uri: string): LeafCertificate {
  const leaf = leafFromPem(certPem, privateKey.export({ type: 'pkcs8', format: 'pem' }) as string)
  if (leaf.uri !== uri) throw new CertificateSourceError('consul-grpc Sign', `the signed leaf is for ${leaf.uri}, not ${uri}`)
  return leaf
}

function rpcError (method: string, err: grpc.ServiceError): Error {
  const code = grpc.status[err.code]
  return new CertificateSourceError(`consul-grpc ${method}`, `${code}: ${err.details}`, { cause: err })
}

/** Full-jitter exponential backoff after `failures` consecutive failures. */
function backoff (failures: number, random: () => number): number {
  const ceiling = Math.min(BACKOFF.maxMs, BACKOFF.initialMs * 2 ** Math.min(Math.max(failures - 1, 0), 30))
  return Math.max(1, Math.floor(random() * ceiling))
}

function nonEmpty (value: string | undefined): string | undefined {
  return value === undefined || value === '' ? undefined : value
}
