// The dynamic TLS side: one secure context built per change of leaf or roots, served both through
// SNICallback and as the default context of every server (clients that connect by IP send no SNI,
// and the context chosen is also the one whose CA list verifies the client).
import { constants, randomBytes, X509Certificate } from 'node:crypto'
import tls from 'node:tls'
import type { SecureContext, Server as TlsServer } from 'node:tls'
import type { FastifyBaseLogger } from 'fastify'
import { InvalidOptionError } from './errors'
import { serverBindingsOf } from './fastify-internals'
import { IdentityResolver } from './identity'
import { logEvent } from './log'

/** The certificate material the agent gives: a leaf chain with its key, and every trusted root. */
export interface TlsMaterial {
  /** `CertPEM`: the leaf followed by its intermediates, served as-is. */
  readonly certPem: string
  readonly keyPem: string
  /** `RootCert` of every root, active or not. */
  readonly rootPems: readonly string[]
  /** The roots' `IntermediateCerts`, for re-checking resumed sessions (never trusted on their own). */
  readonly intermediatePems?: readonly string[]
  readonly trustDomain: string
}

/** Options a user may add to `httpsOptions()`; the security-relevant ones belong to the plugin. */
export type HttpsOptionsInput = Omit<tls.TlsOptions, 'key' | 'cert' | 'ca' | 'pfx' | 'requestCert' | 'rejectUnauthorized' | 'SNICallback' | 'sessionIdContext'> & { allowHTTP1?: boolean }

const OWNED_OPTIONS = ['key', 'cert', 'ca', 'pfx', 'requestCert', 'rejectUnauthorized', 'SNICallback', 'sessionIdContext'] as const
const TLS_VERSIONS = ['TLSv1.2', 'TLSv1.3']
const DRAIN_INTERVAL_MS = 50

// The user's TLS settings that live in a secure context: Node's setSecureContext() resets every
// one it is not given, so each context the plugin builds carries them again.
const CONTEXT_OPTIONS = ['minVersion', 'maxVersion', 'ciphers', 'ecdhCurve', 'sigalgs', 'honorCipherOrder', 'secureOptions',
  'dhparam', 'crl', 'sessionTimeout', 'ticketKeys'] as const

/** State shared by the https options object, the servers built from it and the plugin. */
export class DynamicTls {
  readonly id = randomBytes(16).toString('hex')
  readonly identities = new IdentityResolver()
  readonly #settings: tls.SecureContextOptions
  #context: SecureContext | null = null
  #material: TlsMaterial | null = null
  #servers = new Set<TlsServer>()
  #drain: NodeJS.Timeout | null = null

  /** Hands the current context to clients that send SNI; `undefined` keeps the default context. */
  readonly SNICallback = (_servername: string, cb: (err: Error | null, ctx?: SecureContext) => void): void => {
    cb(null, this.#context ?? undefined)
  }

  /** `settings`: the TLS options of `httpsOptions()` that belong in every secure context. */
  constructor (settings: tls.SecureContextOptions = {}) {
    this.#settings = {
      ...settings,
      // TLS 1.2 renegotiation could swap the client certificate after the identity was read.
      secureOptions: (settings.secureOptions ?? 0) | constants.SSL_OP_NO_RENEGOTIATION,
      // Kept on the server object, where dynamicTlsOf() finds this state again.
      sessionIdContext: this.id
    }
  }

  get material (): TlsMaterial | null { return this.#material }

  /**
   * Installs new material. Builds the context first, so a key that does not match its certificate
   * throws here and the previous material stays in place.
   */
  update (material: TlsMaterial): void {
    const options = this.contextOptions(material)
    const context = tls.createSecureContext(options)
    const roots = material.rootPems.map((pem) => new X509Certificate(pem))
    const rootsChanged = this.#material === null ||
      this.#material.trustDomain !== material.trustDomain ||
      !sameList(this.#material.rootPems, material.rootPems) ||
      !sameList(this.#material.intermediatePems ?? [], material.intermediatePems ?? [])
    this.#context = context
    this.#material = material
    const intermediates = (material.intermediatePems ?? []).map((pem) => new X509Certificate(pem))
    if (rootsChanged) this.identities.setTrust({ trustDomain: material.trustDomain, roots, intermediates })
    for (const server of this.#servers) server.setSecureContext(options)
  }

  /** Takes charge of a server built from these options: current context now and on every change. */
  attach (server: unknown): void {
    if (!(server instanceof tls.Server)) return
    if (this.#servers.has(server)) return
    this.#servers.add(server)
    server.on('connection', (socket: object) => this.identities.noteConnection(socket))
    if (this.#material !== null) server.setSecureContext(this.contextOptions(this.#material))
  }

  /**
   * From now on, closes each connection as soon as it is idle. Node closes the connections idle
   * when a server closes, but a keep-alive connection busy at that moment would stay open until
   * keepAliveTimeout (72 s in Fastify) and hold close() that long. Stopped by detachAll().
   */
  drainConnections (): void {
    const closeIdle = (): void => {
      // HTTP/2 servers have no such method; Fastify closes their sessions itself.
      for (const server of this.#servers) (server as { closeIdleConnections?: () => void }).closeIdleConnections?.()
    }
    closeIdle()
    clearInterval(this.#drain ?? undefined)
    this.#drain = setInterval(closeIdle, DRAIN_INTERVAL_MS).unref()
  }

  detachAll (): void {
    clearInterval(this.#drain ?? undefined)
    this.#drain = null
    this.#servers.clear()
    registry.delete(this.id)
  }

  /** Everything a secure context for `material` needs: the certificate, the roots and the user's settings. */
  contextOptions (material: TlsMaterial): tls.SecureContextOptions {
    return { ...this.#settings, key: material.keyPem, cert: material.certPem, ca: [...material.rootPems] }
  }
}

// Weakly held: options created but never used by the plugin do not keep their state alive.
const registry = new Map<string, WeakRef<DynamicTls>>()
const forget = new FinalizationRegistry<string>((id) => registry.delete(id))

/** Finds the dynamic TLS state of a server created with `httpsOptions()`, or null. */
export function dynamicTlsOf (server: unknown): DynamicTls | null {
  if (!(server instanceof tls.Server)) return null
  const id = (server as unknown as { sessionIdContext?: unknown }).sessionIdContext
  return typeof id === 'string' ? registry.get(id)?.deref() ?? null : null
}

/**
 * The onListen hook body: Fastify opens one extra server per address family when listening on
 * `localhost`; they were built from the same options, and must follow every rotation too.
 */
export function attachExtraServers (tls: DynamicTls, fastify: object, log: FastifyBaseLogger): void {
  const bindings = serverBindingsOf(fastify)
  if (bindings === null) {
    logEvent(log, 'warn', 'server-bindings-unknown', null, 'cannot find Fastify\'s extra servers; listen on an explicit host so every server follows certificate rotations')
    return
  }
  for (const server of bindings) if (dynamicTlsOf(server) === tls) tls.attach(server)
}

/**
 * TLS server options for Fastify's `https` option. The plugin then supplies the certificate and
 * the roots. Client certificates are requested but not required at the handshake, so Consul's
 * health check (which has none) can reach exempt routes; every other route demands an identity.
 */
export function httpsOptions (extra: HttpsOptionsInput = {}): tls.TlsOptions & { allowHTTP1?: boolean } {
  if (extra === null || typeof extra !== 'object') {
    throw new InvalidOptionError('httpsOptions()', 'expects an object of TLS server options')
  }
  for (const name of OWNED_OPTIONS) {
    if (name in extra) {
      throw new InvalidOptionError(`httpsOptions({ ${name} })`, 'is set by the plugin from the Consul agent and cannot be given')
    }
  }
  for (const name of ['minVersion', 'maxVersion'] as const) {
    const value = extra[name]
    if (value !== undefined && !TLS_VERSIONS.includes(value)) {
      throw new InvalidOptionError(`httpsOptions({ ${name} })`, `must be 'TLSv1.2' or 'TLSv1.3', got ${JSON.stringify(value)}`)
    }
  }
  const merged = { minVersion: 'TLSv1.2' as const, ...extra }
  const settings: Record<string, unknown> = {}
  for (const name of CONTEXT_OPTIONS) if (merged[name] !== undefined) settings[name] = merged[name]
  const state = new DynamicTls(settings as tls.SecureContextOptions)
  registry.set(state.id, new WeakRef(state))
  forget.register(state, state.id)
  const options: tls.TlsOptions & { allowHTTP1?: boolean } = {
    ...merged,
    secureOptions: (merged.secureOptions ?? 0) | constants.SSL_OP_NO_RENEGOTIATION,
    requestCert: true,
    rejectUnauthorized: false,
    SNICallback: state.SNICallback,
    sessionIdContext: state.id
  }
  // Servers created after the first sync (Fastify's secondary bindings for `localhost`) start
  // with the current material: Node reads these when it builds the server's default context.
  for (const name of ['key', 'cert', 'ca'] as const) {
    Object.defineProperty(options, name, {
      enumerable: true,
      get: () => {
        const material = state.material
        if (material === null) return undefined
        return name === 'key' ? material.keyPem : name === 'cert' ? material.certPem : [...material.rootPems]
      }
    })
  }
  return options
}

function sameList (a: readonly string[], b: readonly string[]): boolean {
  if (a.length !== b.length) return false
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false
  return true
}
